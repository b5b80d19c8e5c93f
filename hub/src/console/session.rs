//! Console sessions, sans-IO: an API token exchanged at log-in for a random session id (the cookie) with its own
//! CSRF token and expiry. Ids and times come from the caller, so every rule here is tested without a clock or RNG.
//!
//! The token itself stays in the hub's memory, never in a page or a cookie: each console request calls the API
//! in-process with it, so the API's checks (role, expiry, revocation, region scope, audit of denials) decide what
//! the console may show and do, exactly as for the CLI. Sessions live in memory: a hub restart logs everyone out.

use std::collections::HashMap;

/// How long a session lasts at most (a token that expires sooner ends it sooner).
pub const SESSION_SECS: u64 = 8 * 3600;
/// Sessions kept at most; the oldest is dropped first (a flood of log-ins cannot grow memory without bound).
pub const MAX_SESSIONS: usize = 10_000;

/// A logged-in operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The API token the session acts with (never rendered).
    pub token: String,
    /// The token's name, role and regions as the API answered at log-in, for what the page offers; the API checks
    /// again on every call.
    pub name: String,
    pub role: String,
    pub regions: Option<Vec<String>>,
    /// Must come back with every state-changing form.
    pub csrf: String,
    pub created_at: u64,
    pub expires_at: u64,
}

impl Session {
    /// Whether the page should offer operator actions (the API refuses them anyway for a viewer).
    pub fn can_act(&self) -> bool {
        self.role == "operator" || self.role == "admin"
    }

    pub fn is_admin(&self) -> bool {
        self.role == "admin"
    }
}

/// Who the API said the token is, at log-in.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub role: String,
    pub regions: Option<Vec<String>>,
    pub expires_at: Option<u64>,
}

/// The session table.
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: HashMap<String, Session>,
}

impl Sessions {
    /// Opens a session under `id` (random, from the caller) that ends at the earlier of the token's expiry and
    /// [`SESSION_SECS`] from `now`.
    pub fn open(
        &mut self,
        id: String,
        csrf: String,
        token: String,
        who: Identity,
        now: u64,
    ) -> &Session {
        self.prune(now);
        if self.by_id.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.created_at)
                .map(|(k, _)| k.clone())
        {
            self.by_id.remove(&oldest);
        }
        let expires_at = (now + SESSION_SECS).min(who.expires_at.unwrap_or(u64::MAX));
        self.by_id
            .entry(id)
            .insert_entry(Session {
                token,
                name: who.name,
                role: who.role,
                regions: who.regions,
                csrf,
                created_at: now,
                expires_at,
            })
            .into_mut()
    }

    /// The live session under `id`; an expired one is removed and reads as none.
    pub fn get(&mut self, id: &str, now: u64) -> Option<Session> {
        match self.by_id.get(id) {
            Some(s) if s.expires_at > now => Some(s.clone()),
            Some(_) => {
                self.by_id.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends the session (log-out, or the API no longer accepting its token).
    pub fn close(&mut self, id: &str) -> bool {
        self.by_id.remove(id).is_some()
    }

    /// Drops every expired session.
    pub fn prune(&mut self, now: u64) {
        self.by_id.retain(|_, s| s.expires_at > now);
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// Whether a submitted CSRF token matches the session's, in time independent of where they differ.
pub fn csrf_ok(session: &Session, submitted: Option<&str>) -> bool {
    tokens_match(&session.csrf, submitted)
}

/// Whether a submitted token equals the expected one (non-empty), in time independent of where they differ.
pub fn tokens_match(expected: &str, submitted: Option<&str>) -> bool {
    let Some(s) = submitted else { return false };
    let (a, b) = (expected.as_bytes(), s.as_bytes());
    a.len() == b.len()
        && !a.is_empty()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session id in a `Cookie` header value (`flotilla_session=...`).
pub fn cookie_value<'a>(cookie_header: &'a str, name: &str) -> Option<&'a str> {
    cookie_header
        .split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(expires_at: Option<u64>) -> Identity {
        Identity {
            name: "ops".into(),
            role: "operator".into(),
            regions: None,
            expires_at,
        }
    }

    #[test]
    fn a_session_ends_at_the_earlier_of_its_own_life_and_the_tokens() {
        // (token expiry, expected session end) for a log-in at t=1000
        let cases = [
            (None, 1000 + SESSION_SECS),
            (Some(2000), 2000),
            (Some(1000 + SESSION_SECS + 5), 1000 + SESSION_SECS),
        ];
        for (exp, want) in cases {
            let mut s = Sessions::default();
            let got = s
                .open("id".into(), "c".into(), "t".into(), who(exp), 1000)
                .expires_at;
            assert_eq!(got, want, "token expiry {exp:?}");
            assert!(s.get("id", want - 1).is_some());
            assert!(s.get("id", want).is_none(), "expired at {want}");
            assert!(s.is_empty(), "an expired session is removed when read");
        }
    }

    #[test]
    fn unknown_and_closed_sessions_read_as_none() {
        let mut s = Sessions::default();
        s.open("a".into(), "c".into(), "t".into(), who(None), 0);
        assert!(s.get("b", 1).is_none());
        assert!(s.close("a"));
        assert!(s.get("a", 1).is_none());
        assert!(!s.close("a"));
    }

    #[test]
    fn the_table_is_bounded_dropping_the_oldest() {
        let mut s = Sessions::default();
        for i in 0..MAX_SESSIONS as u64 + 3 {
            s.open(format!("s{i}"), "c".into(), "t".into(), who(None), i);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.get("s0", 10).is_none() && s.get("s2", 10).is_none());
        assert!(s.get("s3", 10).is_some());
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let mut t = Sessions::default();
        let sess = t
            .open("a".into(), "abc123".into(), "t".into(), who(None), 0)
            .clone();
        let cases = [
            (Some("abc123"), true),
            (Some("abc124"), false),
            (Some("abc12"), false),
            (Some(""), false),
            (None, false),
        ];
        for (submitted, want) in cases {
            assert_eq!(csrf_ok(&sess, submitted), want, "{submitted:?}");
        }
    }

    #[test]
    fn cookies_are_found_by_name() {
        let cases = [
            ("flotilla_session=abc", Some("abc")),
            ("a=1; flotilla_session=xyz; b=2", Some("xyz")),
            ("flotilla_session_x=1", None),
            ("", None),
        ];
        for (header, want) in cases {
            assert_eq!(cookie_value(header, "flotilla_session"), want, "{header}");
        }
    }
}
