//! MQTT 3.1.1 topic names and filters: validation and a subscription tree that matches a topic against every filter
//! in time proportional to the topic's depth, not to the number of subscriptions (10,000 agents each hold exact
//! filters of their own; the hub holds a handful of `+` filters).

use std::collections::HashMap;

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error("empty topic")]
    Empty,
    #[error("topic contains a NUL character")]
    Nul,
    #[error("a topic name must not contain wildcards")]
    WildcardInName,
    #[error("'#' must be the last level of a filter and stand alone")]
    MisplacedHash,
    #[error("'+' must occupy a whole level of a filter")]
    MisplacedPlus,
}

/// Checks a topic name a client publishes to (or names in its will).
pub fn validate_name(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.contains('\0') {
        return Err(TopicError::Nul);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a topic filter a client subscribes to.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    if filter.is_empty() {
        return Err(TopicError::Empty);
    }
    if filter.contains('\0') {
        return Err(TopicError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedHash);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

/// Whether `filter` (valid) matches `topic` (a valid name). Filters that start with a wildcard do not match topics
/// that start with `$` (MQTT 3.1.1, 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut t = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match t.next() {
            Some(level) if f == "+" || f == level => {}
            _ => return false,
        }
    }
    t.next().is_none()
}

/// A subscription tree keyed by topic level, holding values `V` (subscriber, QoS) at the filter's end.
#[derive(Debug)]
pub struct Tree<V> {
    root: Node<V>,
}

#[derive(Debug)]
struct Node<V> {
    exact: HashMap<Box<str>, Node<V>>,
    plus: Option<Box<Node<V>>>,
    /// Subscribers of `<path>/#` (which also matches `<path>` itself).
    hash: Vec<V>,
    /// Subscribers of exactly `<path>`.
    here: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::new(),
            plus: None,
            hash: Vec::new(),
            here: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.plus.is_none() && self.hash.is_empty() && self.here.is_empty()
    }
}

impl<V> Default for Tree<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
        }
    }
}

impl<V: Clone> Tree<V> {
    /// Adds `value` under `filter` (validated by the caller), replacing an entry for which `same` holds.
    pub fn insert(&mut self, filter: &str, value: V, same: impl Fn(&V) -> bool) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = match level {
                "#" => {
                    upsert(&mut node.hash, value, same);
                    return;
                }
                "+" => node.plus.get_or_insert_with(Box::default),
                _ => node.exact.entry(level.into()).or_default(),
            };
        }
        upsert(&mut node.here, value, same);
    }

    /// Removes the entry under `filter` for which `same` holds, and prunes emptied branches.
    pub fn remove(&mut self, filter: &str, same: impl Fn(&V) -> bool) {
        let levels: Vec<&str> = filter.split('/').collect();
        remove_at(&mut self.root, &levels, &same);
    }

    /// Calls `f` for every value whose filter matches `topic` (a valid name). A subscriber with overlapping filters
    /// is seen once per matching filter; the caller merges.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, 0, dollar, &mut f);
    }
}

fn upsert<V>(list: &mut Vec<V>, value: V, same: impl Fn(&V) -> bool) {
    match list.iter_mut().find(|v| same(v)) {
        Some(slot) => *slot = value,
        None => list.push(value),
    }
}

fn remove_at<V>(node: &mut Node<V>, levels: &[&str], same: &impl Fn(&V) -> bool) {
    let Some((first, rest)) = levels.split_first() else {
        node.here.retain(|v| !same(v));
        return;
    };
    match *first {
        "#" => node.hash.retain(|v| !same(v)),
        "+" => {
            if let Some(child) = node.plus.as_deref_mut() {
                remove_at(child, rest, same);
                if child.is_empty() {
                    node.plus = None;
                }
            }
        }
        level => {
            if let Some(child) = node.exact.get_mut(level) {
                remove_at(child, rest, same);
                if child.is_empty() {
                    node.exact.remove(level);
                }
            }
        }
    }
}

fn walk<V>(node: &Node<V>, levels: &[&str], depth: usize, dollar: bool, f: &mut impl FnMut(&V)) {
    // Wildcards at the first level never match `$` topics.
    let wild = !(dollar && depth == 0);
    if wild {
        node.hash.iter().for_each(&mut *f);
    }
    let Some(level) = levels.get(depth) else {
        node.here.iter().for_each(&mut *f);
        return;
    };
    if let Some(child) = node.exact.get(*level) {
        walk(child, levels, depth + 1, dollar, f);
    }
    if wild && let Some(child) = node.plus.as_deref() {
        walk(child, levels, depth + 1, dollar, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_validation() {
        let cases: &[(&str, Result<(), TopicError>)] = &[
            ("a/b/c", Ok(())),
            ("a/+/c", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("a/#", Ok(())),
            ("/", Ok(())),
            ("", Err(TopicError::Empty)),
            ("a/#/c", Err(TopicError::MisplacedHash)),
            ("a#", Err(TopicError::MisplacedHash)),
            ("a/b+", Err(TopicError::MisplacedPlus)),
            ("a\0b", Err(TopicError::Nul)),
        ];
        for (filter, want) in cases {
            assert_eq!(validate_filter(filter), *want, "{filter:?}");
        }
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/b"), Ok(()));
    }

    /// Every (filter, topic) pair is checked three ways: `matches`, the tree, and the expectation.
    #[test]
    fn tree_agrees_with_matches() {
        let cases: &[(&str, &str, bool)] = &[
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a/b/d", false),
            ("a//c", "a//c", true),
            ("a/b/c", "a/b", false),
        ];
        for (filter, topic, want) in cases {
            assert_eq!(
                matches(filter, topic),
                *want,
                "matches({filter:?}, {topic:?})"
            );
            let mut tree = Tree::default();
            tree.insert(filter, 1u8, |v| *v == 1);
            let mut hits = 0;
            tree.for_each_match(topic, |_| hits += 1);
            assert_eq!(hits == 1, *want, "tree({filter:?}, {topic:?})");
        }
    }

    #[test]
    fn remove_prunes_and_keeps_others() {
        let mut tree = Tree::default();
        tree.insert("d/1/desired", "one", |v| *v == "one");
        tree.insert("d/+/report", "hub", |v| *v == "hub");
        tree.insert("d/+/report", "hub", |v| *v == "hub");
        fn collect(tree: &Tree<&'static str>, topic: &str) -> Vec<&'static str> {
            let mut out = vec![];
            tree.for_each_match(topic, |v| out.push(*v));
            out
        }
        assert_eq!(
            collect(&tree, "d/1/report"),
            ["hub"],
            "upsert, not duplicate"
        );
        tree.remove("d/1/desired", |v| *v == "one");
        assert!(collect(&tree, "d/1/desired").is_empty());
        assert!(!tree.root.exact["d"].exact.contains_key("1"), "pruned");
        assert_eq!(collect(&tree, "d/7/report"), ["hub"]);
        tree.remove("d/+/report", |v| *v == "hub");
        assert!(tree.root.is_empty());
    }

    proptest::proptest! {
        /// The tree and the plain matcher agree on arbitrary filters and topics over a small alphabet (so that
        /// matches actually happen).
        #[test]
        fn tree_agrees_with_matches_on_arbitrary_input(
            filter in "[ab+#$/]{1,8}",
            topic in "[ab$/]{0,8}",
        ) {
            if validate_filter(&filter).is_ok() && validate_name(&topic).is_ok() {
                let mut tree = Tree::default();
                tree.insert(&filter, (), |_| true);
                let mut hits = 0;
                tree.for_each_match(&topic, |_| hits += 1);
                proptest::prop_assert_eq!(hits == 1, matches(&filter, &topic));
                tree.remove(&filter, |_| true);
                proptest::prop_assert!(tree.root.is_empty());
            }
        }
    }
}
