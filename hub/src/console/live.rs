//! The live pages' event streams: one server-sent-events stream per page, whose events are named after the page's
//! `sse-swap` fragments and carry the fragment's new HTML. Each second the stream asks the API again, renders the
//! fragments and sends only those that differ from what the browser has: the page puts a fingerprint of each
//! fragment it rendered in the stream's URL (`seen=`), so even the first event carries only what changed since the
//! page was rendered. It ends when the session ends.
//!
//! No compression layer wraps these responses (a compressing proxy or layer would buffer them), and
//! `X-Accel-Buffering: no` tells nginx-style proxies not to buffer either.

use super::{Console, Op, model, views};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

/// How often a stream looks for changes.
const EVERY: Duration = Duration::from_secs(1);

/// Which fragments changed since the last send: keeps a fingerprint of each.
#[derive(Debug, Default)]
pub struct Changes {
    last: HashMap<String, u64>,
}

impl Changes {
    /// Starts from what the page showed (its `seen` parameter, `name:hex,...`; anything unreadable is ignored,
    /// which only means that fragment is sent once more).
    pub fn seeded(seen: &str) -> Self {
        let last = seen
            .split(',')
            .filter_map(|kv| kv.split_once(':'))
            .filter_map(|(k, h)| Some((k.to_owned(), u64::from_str_radix(h, 16).ok()?)))
            .collect();
        Self { last }
    }

    /// The fragments of `now` that differ from the last ones sent, remembered as sent.
    pub fn changed(&mut self, now: Vec<(&'static str, String)>) -> Vec<(&'static str, String)> {
        let mut out = vec![];
        for (k, html) in now {
            let h = views::fingerprint(&html);
            if self.last.get(k) != Some(&h) {
                self.last.insert(k.to_owned(), h);
                out.push((k, html));
            }
        }
        out
    }
}

/// What a page's stream renders each tick: its fragments, or `None` when the session can no longer see it.
type Render = Box<
    dyn Fn(
            Console,
            Op,
        ) -> futures_util::future::BoxFuture<'static, Option<Vec<(&'static str, String)>>>
        + Send
        + Sync,
>;

fn stream(c: Console, op: Op, seen: &str, render: Render) -> Response {
    let s = async_stream(c, op, Changes::seeded(seen), render);
    let mut resp = Sse::new(s).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn async_stream(
    c: Console,
    op: Op,
    changes: Changes,
    render: Render,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    let state = (c, op, render, changes, true);
    futures_util::stream::unfold(state, |(c, op, render, mut changes, first)| async move {
        let mut first = first;
        loop {
            if !first {
                tokio::time::sleep(EVERY).await;
            }
            first = false;
            // The session must still be open (log-out ends the stream).
            let now = crate::hub::unix_now();
            c.sessions().get(&op.id, now)?;
            let fragments = render(
                c.clone(),
                Op {
                    id: op.id.clone(),
                    s: op.s.clone(),
                },
            )
            .await?;
            let changed = changes.changed(fragments);
            if changed.is_empty() {
                continue;
            }
            // Several fragments in one batch: each its own event, sent back to back.
            let events: Vec<Event> = changed
                .into_iter()
                .map(|(name, html)| Event::default().event(name).data(html))
                .collect();
            return Some((
                futures_util::stream::iter(events.into_iter().map(Ok)),
                (c, op, render, changes, false),
            ));
        }
    })
    .flatten()
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct OverviewQuery {
    colour: String,
    seen: String,
}

/// `?seen=` of a stream's URL: what the page showed.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct Seen {
    seen: String,
}

/// `GET /events/overview`: the map, the region table and the rollouts in progress.
pub(super) async fn overview(
    State(c): State<Console>,
    headers: HeaderMap,
    q: Result<Query<OverviewQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(op) = c.op(&headers) else {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let colouring = super::colouring(&q.colour);
    stream(
        c,
        op,
        &q.seen,
        Box::new(move |c, op| {
            Box::pin(async move {
                let summary: model::Summary = c.get(&op, "/api/v1/fleet/summary").await.ok()?;
                let rollouts: Vec<model::RolloutRow> = c.get(&op, "/api/v1/rollouts").await.ok()?;
                Some(views::overview_fragments(&summary, &rollouts, colouring))
            })
        }),
    )
}

/// `GET /events/rollouts/{name}`: the rollout's state, waves and history.
pub(super) async fn rollout(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<Seen>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(op) = c.op(&headers) else {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    let enc = views::urlencode(&name);
    let seen = q.map(|Query(q)| q.seen).unwrap_or_default();
    stream(
        c,
        op,
        &seen,
        Box::new(move |c, op| {
            let enc = enc.clone();
            Box::pin(async move {
                let r: model::Rollout =
                    c.get(&op, &format!("/api/v1/rollouts/{enc}")).await.ok()?;
                let rep: model::Report = c
                    .get(&op, &format!("/api/v1/rollouts/{enc}/report"))
                    .await
                    .ok()?;
                let csrf = op.s.can_act().then_some(op.s.csrf.as_str());
                Some(views::rollout_fragments(&r, &rep, csrf))
            })
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fragments = Vec<(&'static str, String)>;

    #[test]
    fn only_changed_fragments_are_sent() {
        let mut c = Changes::default();
        let f = |a: &str, b: &str| vec![("a", a.to_owned()), ("b", b.to_owned())];
        // (fragments now, names expected to be sent)
        let steps: [(Fragments, &[&str]); 4] = [
            (f("1", "x"), &["a", "b"]),
            (f("1", "x"), &[]),
            (f("2", "x"), &["a"]),
            (f("2", "y"), &["b"]),
        ];
        for (i, (now, want)) in steps.into_iter().enumerate() {
            let sent: Vec<&str> = c.changed(now).into_iter().map(|(k, _)| k).collect();
            assert_eq!(sent, want, "step {i}");
        }
    }

    #[test]
    fn a_stream_starts_from_what_the_page_showed() {
        let page = vec![("a", "1".to_owned()), ("b", "x".to_owned())];
        let seen = views::seen(&page);
        // (seen parameter, fragments now, names expected in the first send)
        let cases: [(&str, Fragments, &[&str]); 4] = [
            (&seen, page.clone(), &[]),
            (
                &seen,
                vec![("a", "2".to_owned()), ("b", "x".to_owned())],
                &["a"],
            ),
            ("", page.clone(), &["a", "b"]),
            ("a:zz,b", page.clone(), &["a", "b"]),
        ];
        for (seen, now, want) in cases {
            let sent: Vec<&str> = Changes::seeded(seen)
                .changed(now)
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(sent, want, "seen {seen:?}");
        }
    }
}
