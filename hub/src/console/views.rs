//! The console's HTML, rendered with maud from the page models alone (no I/O, the time passed in), so every page
//! is snapshot-tested against fixture data. Live fragments (`sse-swap`) are functions of their own, used both in
//! the page and in the event stream, so a swapped fragment is exactly what a reload would show.
//!
//! No inline script or style anywhere (the Content-Security-Policy forbids them), no token in any page: forms
//! carry only the session's CSRF token.

use super::map::{self, Colouring, Marker};
use super::model::*;
use maud::{DOCTYPE, Markup, PreEscaped, html};

/// What every page's frame needs of the session.
#[derive(Debug, Clone)]
pub struct Frame<'a> {
    pub name: &'a str,
    pub role: &'a str,
    pub regions: Option<&'a [String]>,
    pub csrf: &'a str,
    pub admin: bool,
    pub now: u64,
}

/// Top navigation entries: (path, label).
const NAV: [(&str, &str); 6] = [
    ("/", "Overview"),
    ("/devices", "Devices"),
    ("/releases", "Releases"),
    ("/deployments", "Deployments"),
    ("/rollouts", "Rollouts"),
    ("/audit", "Audit"),
];

/// htmx settings: no inline indicator styles (CSP), no eval, no script tags in swapped content.
const HTMX_CONFIG: &str = r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"historyCacheSize":0}"#;

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            meta name="htmx-config" content=(HTMX_CONFIG);
            title { (title) " · Flotilla" }
            link rel="stylesheet" href="/static/console.css";
            script src="/static/htmx-2.min.js" defer {}
            script src="/static/hx-sse-2.min.js" defer {}
        }
    }
}

/// The page frame: navigation, who is logged in, log-out, the body; `live` is the page's event stream.
pub fn page(f: &Frame<'_>, active: &str, title: &str, live: Option<&str>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/" { "Flotilla" }
                    nav {
                        @for (path, label) in NAV {
                            @if path != "/audit" || f.admin {
                                a href=(path) class=[(path == active).then_some("active")] { (label) }
                            }
                        }
                    }
                    div.who {
                        span.name { (f.name) }
                        " " span.role { (f.role) }
                        @if let Some(r) = f.regions {
                            " " span.scope title="this token is limited to these regions" { (r.join(", ")) }
                        }
                        form.inline method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(f.csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main {
                    h1 { (title) }
                    @if let Some(url) = live {
                        div hx-ext="sse" sse-connect=(url) { (body) }
                    } @else {
                        (body)
                    }
                }
            }
        }
    }
}

/// The log-in page (no session yet; `csrf` is the log-in form's own token, from its cookie).
pub fn login(csrf: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body.login {
                main {
                    h1 { "Flotilla" }
                    p { "Log in with an API token (" code { "flotilla token --name NAME --role ROLE" } ")." }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    form method="post" action="/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        label { "API token " input type="password" name="token" autocomplete="off" required; }
                        button type="submit" { "Log in" }
                    }
                }
            }
        }
    }
}

/// An error page inside the frame (a refusal, a missing device).
pub fn problem(f: &Frame<'_>, active: &str, status: u16, detail: &str) -> Markup {
    page(
        f,
        active,
        if status == 403 {
            "Not allowed"
        } else {
            "Problem"
        },
        None,
        html! { p.error role="alert" { (status) ": " (detail) } },
    )
}

/// `2026-12-06 17:40:12Z` for a Unix time.
pub fn when(t: u64) -> String {
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(t.min(253_402_300_799) as i64) else {
        return t.to_string();
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// `42 s ago`, `3 min ago`, `5 h ago`, `2 d ago`.
pub fn ago(now: u64, t: u64) -> String {
    let d = now.saturating_sub(t);
    match d {
        0..60 => format!("{d} s ago"),
        60..3600 => format!("{} min ago", d / 60),
        3600..86_400 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86_400),
    }
}

/// `4 min 05 s` for a countdown.
pub fn duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min {:02} s", secs / 60, secs % 60),
        _ => format!("{} h {:02} min", secs / 3600, (secs % 3600) / 60),
    }
}

fn or_dash(s: Option<&str>) -> &str {
    s.unwrap_or("—")
}

// ---- Overview -------------------------------------------------------------------------------------------------

/// The fleet overview: the map, the region table and the rollouts in progress.
pub fn overview(
    f: &Frame<'_>,
    s: &Summary,
    rollouts: &[RolloutRow],
    colouring: Colouring,
) -> Markup {
    let colour = match colouring {
        Colouring::Health => "health",
        Colouring::Version => "version",
    };
    let fragments = overview_fragments(s, rollouts, colouring);
    let url = format!("/events/overview?colour={colour}&seen={}", seen(&fragments));
    let body = html! {
        p.switch {
            "Colour by: "
            a href="/?colour=health" class=[(colouring == Colouring::Health).then_some("active")] { "health" }
            " · "
            a href="/?colour=version" class=[(colouring == Colouring::Version).then_some("active")] { "version" }
        }
        (live_fragments(&fragments))
    };
    page(f, "/", "Fleet overview", Some(&url), body)
}

/// The live fragments of the overview.
pub fn overview_fragments(
    s: &Summary,
    rollouts: &[RolloutRow],
    colouring: Colouring,
) -> Vec<(&'static str, String)> {
    vec![
        ("map", overview_map(s, colouring).into_string()),
        ("regions", overview_regions(s).into_string()),
        ("rollouts", overview_rollouts(rollouts).into_string()),
    ]
}

/// The map: basemap image, one marker per zone (a link to its devices), the legend.
pub fn overview_map(s: &Summary, colouring: Colouring) -> Markup {
    let markers = map::markers(&s.regions, colouring);
    let legend = map::legend(&s.regions);
    html! {
        svg.map viewBox=(format!("0 0 {} {}", map::WIDTH, map::HEIGHT)) role="img"
            aria-label="Devices per region and zone on a world map" {
            image href="/static/world-110m.svg" x="0" y="0" width=(map::WIDTH) height=(map::HEIGHT) {}
            @for m in &markers { (marker(m)) }
        }
        ul.legend {
            @match colouring {
                Colouring::Health => {
                    li { span.dot.t-converged {} "converged" }
                    li { span.dot.t-updating {} "updating" }
                    li { span.dot.t-held {} "held" }
                    li { span.dot.t-failing {} "failing" }
                    li { span.dot.t-offline {} "mostly offline" }
                }
                Colouring::Version => {
                    @for (i, (v, n)) in legend.iter().enumerate() {
                        li { span class=(format!("dot {}", map::Tone::Version(i).class())) {} (v) " (" (n) ")" }
                    }
                }
            }
        }
    }
}

fn marker(m: &Marker) -> Markup {
    let mut href = String::from("/devices?");
    if let Some(r) = &m.region {
        href.push_str(&format!("region={}", urlencode(r)));
    }
    if let Some(z) = &m.zone {
        href.push_str(&format!("&zone={}", urlencode(z)));
    }
    let place = match (&m.region, &m.zone) {
        (Some(r), Some(z)) => format!("{r} / {z}"),
        (Some(r), None) => r.clone(),
        (None, Some(z)) => z.clone(),
        (None, None) => "no region".into(),
    };
    let versions: Vec<String> = m
        .versions
        .iter()
        .map(|(v, n)| format!("{v}: {n}"))
        .collect();
    let title = format!(
        "{place}: {} devices, {} online, {} converged, {} failing, {} held{}",
        m.counts.devices,
        m.counts.online,
        m.counts.converged,
        m.counts.failing,
        m.counts.held,
        if versions.is_empty() {
            String::new()
        } else {
            format!("; {}", versions.join(", "))
        }
    );
    html! {
        a href=(href) {
            circle class=(format!("marker {}", m.tone.class())) cx=(format!("{:.1}", m.x)) cy=(format!("{:.1}", m.y))
                r=(format!("{:.1}", m.r)) data-region=[m.region.as_deref()] data-zone=[m.zone.as_deref()] {
                title { (title) }
            }
        }
    }
}

/// Counts per region (each a link to its devices), zones beneath.
pub fn overview_regions(s: &Summary) -> Markup {
    html! {
        table.regions {
            thead { tr { th { "Region / zone" } th { "Devices" } th { "Online" } th { "Converged" } th { "Failing" } th { "Held" } th { "Offline" } } }
            tbody {
                @for r in &s.regions {
                    tr.region data-region=(or_dash(r.region.as_deref())) {
                        td { a href=(region_href(r.region.as_deref(), None)) { (r.region.as_deref().unwrap_or("(no region)")) } }
                        (count_cells(&r.counts))
                    }
                    @for z in &r.zones {
                        @if let Some(zone) = &z.zone {
                            tr.zone {
                                td { a href=(region_href(r.region.as_deref(), Some(zone))) { "↳ " (zone) } }
                                (count_cells(&z.counts))
                            }
                        }
                    }
                }
                tr.total { td { "Fleet" } (count_cells(&s.total)) }
            }
        }
    }
}

fn region_href(region: Option<&str>, zone: Option<&str>) -> String {
    let mut h = String::from("/devices");
    if let Some(r) = region {
        h.push_str(&format!("?region={}", urlencode(r)));
        if let Some(z) = zone {
            h.push_str(&format!("&zone={}", urlencode(z)));
        }
    }
    h
}

fn count_cells(c: &Counts) -> Markup {
    html! {
        td { (c.devices) } td { (c.online) } td { (c.converged) }
        td class=[(c.failing > 0).then_some("bad")] { (c.failing) }
        td class=[(c.held > 0).then_some("warn")] { (c.held) }
        td { (c.offline) }
    }
}

/// Rollouts that have not finished.
pub fn overview_rollouts(rows: &[RolloutRow]) -> Markup {
    let active: Vec<&RolloutRow> = rows.iter().filter(|r| !r.finished).collect();
    html! {
        h2 { "Rollouts in progress" }
        @if active.is_empty() {
            p.quiet { "None." }
        } @else {
            ul { @for r in active { li { a href=(format!("/rollouts/{}", urlencode(&r.deployment))) { (r.deployment) } ": " (r.phase) @if r.paused { " (paused)" } } } }
        }
    }
}

// ---- Devices --------------------------------------------------------------------------------------------------

/// The device list's query, echoed into its filter form, sort links and pages.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct DeviceQuery {
    pub region: String,
    pub zone: String,
    pub label: String,
    pub state: String,
    pub version: String,
    pub q: String,
    pub sort: String,
    pub desc: bool,
    pub page: usize,
}

/// Devices per page of the list.
pub const PAGE_SIZE: usize = 50;

impl DeviceQuery {
    /// The query string for the API (`/api/v1/devices?...`) or for a console link, with `sort`/`desc`/`page`
    /// replaced as given.
    pub fn to_query(&self, sort: &str, desc: bool, page: usize) -> String {
        let mut parts = vec![];
        for (k, v) in [
            ("region", &self.region),
            ("zone", &self.zone),
            ("label", &self.label),
            ("state", &self.state),
            ("version", &self.version),
            ("q", &self.q),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k}={}", urlencode(v)));
            }
        }
        if !sort.is_empty() {
            parts.push(format!("sort={}", urlencode(sort)));
        }
        if desc {
            parts.push("desc=true".into());
        }
        if page > 0 {
            parts.push(format!("page={page}"));
        }
        parts.join("&")
    }
}

pub fn devices(
    f: &Frame<'_>,
    rows: &[Device],
    total: usize,
    q: &DeviceQuery,
    error: Option<&str>,
) -> Markup {
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let col = |key: &str, label: &str| -> Markup {
        let desc = q.sort == key && !q.desc;
        let arrow = if q.sort == key {
            if q.desc { " ▼" } else { " ▲" }
        } else {
            ""
        };
        html! { th { a href=(format!("/devices?{}", q.to_query(key, desc, 0))) { (label) (arrow) } } }
    };
    let body = html! {
        form.filters method="get" action="/devices" {
            label { "Region " input name="region" value=(q.region) size="10"; }
            label { "Zone " input name="zone" value=(q.zone) size="10"; }
            label { "Label " input name="label" value=(q.label) size="12" placeholder="key=value"; }
            label { "State "
                select name="state" {
                    @for s in ["", "online", "offline", "converged", "failing", "held"] {
                        option value=(s) selected[q.state == s] { @if s.is_empty() { "any" } @else { (s) } }
                    }
                }
            }
            label { "Version " input name="version" value=(q.version) size="8"; }
            label { "Search " input name="q" value=(q.q) size="14" placeholder="device id"; }
            button type="submit" { "Filter" }
            " " a href="/devices" { "clear" }
        }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        p.quiet { (total) " devices" @if pages > 1 { ", page " (q.page + 1) " of " (pages) } }
        table.devices {
            thead { tr {
                (col("id", "Device")) (col("region", "Region")) (col("zone", "Zone")) (col("state", "State"))
                (col("version", "Version")) th { "Workloads" } (col("last_seen", "Last seen"))
            } }
            tbody {
                @for d in rows {
                    tr {
                        td { a href=(format!("/devices/{}", urlencode(&d.id))) { (d.id) } }
                        td { (or_dash(d.region.as_deref())) } td { (or_dash(d.zone.as_deref())) }
                        td { (device_state(d)) }
                        td { (versions_of(d)) }
                        td { (d.workloads.iter().filter(|w| w.state == "running").count()) "/" (d.workloads.len()) " running" }
                        td { (ago(f.now, d.last_seen)) }
                    }
                }
            }
        }
        nav.pages {
            @if q.page > 0 { a rel="prev" href=(format!("/devices?{}", q.to_query(&q.sort, q.desc, q.page - 1))) { "← previous" } " " }
            @if q.page + 1 < pages { a rel="next" href=(format!("/devices?{}", q.to_query(&q.sort, q.desc, q.page + 1))) { "next →" } }
        }
    };
    page(f, "/devices", "Devices", None, body)
}

/// The versions a device's workloads run.
fn versions_of(d: &Device) -> String {
    let mut v: Vec<&str> = d
        .workloads
        .iter()
        .filter_map(|w| w.version.as_deref())
        .collect();
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        "—".into()
    } else {
        v.join(", ")
    }
}

/// A badge for the device's state, worst first.
fn device_state(d: &Device) -> Markup {
    let failing = d.rejection.is_some()
        || d.workloads
            .iter()
            .any(|w| w.state == "failed" || w.state == "backing-off");
    let (class, text) = if d.revoked {
        ("badge bad", "revoked")
    } else if failing {
        ("badge bad", "failing")
    } else if d.hold.is_some() {
        ("badge warn", "held")
    } else if !d.online {
        ("badge off", "offline")
    } else if d.applied_generation < d.desired_generation
        || d.workloads.iter().any(|w| w.state != "running")
    {
        ("badge busy", "updating")
    } else {
        ("badge ok", "converged")
    };
    html! { span class=(class) { (text) } }
}

/// The device page: inventory, desired vs reported, `why` per workload, telemetry sparklines, holds, audit.
pub fn device(
    f: &Frame<'_>,
    d: &Device,
    why: &[(String, String)],
    streams: &[Stream],
    audit: Option<&[AuditEntry]>,
) -> Markup {
    let body = html! {
        section.cards {
            div.card {
                h2 { "Inventory" }
                dl {
                    dt { "State" } dd { (device_state(d)) }
                    dt { "Region / zone" } dd { (or_dash(d.region.as_deref())) " / " (or_dash(d.zone.as_deref())) }
                    dt { "Last seen" } dd { (when(d.last_seen)) " (" (ago(f.now, d.last_seen)) ")" }
                    dt { "Architecture" } dd { (d.arch) }
                    dt { "Agent" } dd { (d.agent_version) }
                    dt { "Memory" } dd { (d.memory_mib) " MiB" }
                    dt { "Runtimes" } dd { (d.runtimes.join(", ")) }
                    dt { "Labels" } dd { @for (k, v) in &d.labels { code { (k) "=" (v) } " " } }
                }
            }
            div.card {
                h2 { "Desired vs reported" }
                dl {
                    dt { "Generation" } dd { (d.applied_generation) " applied of " (d.desired_generation) " desired" }
                    dt { "Hold" } dd { (or_dash(d.hold.as_deref())) }
                    dt { "Last refusal" } dd { (or_dash(d.rejection.as_deref())) }
                    dt { "Telemetry dropped" } dd { (d.telemetry_dropped) }
                }
            }
        }
        h2 { "Workloads" }
        table.workloads {
            thead { tr { th { "Workload" } th { "State" } th { "Version" } th { "Restarts" } th { "Last error" } th { "Why" } } }
            tbody {
                @for w in &d.workloads {
                    tr {
                        td { (w.name) }
                        td { span class=(format!("badge {}", workload_class(&w.state))) { (w.state) } }
                        td { (or_dash(w.version.as_deref())) }
                        td { (w.restarts) }
                        td { (or_dash(w.last_error.as_deref().or(w.rejected.as_deref()))) }
                        td.why { (why.iter().find(|(n, _)| *n == w.name).map_or("", |(_, t)| t.as_str())) }
                    }
                }
            }
        }
        @let not_running: Vec<&(String, String)> = why.iter().filter(|(n, _)| !d.workloads.iter().any(|w| &w.name == n)).collect();
        @if !not_running.is_empty() {
            h3 { "Not running here" }
            ul.why { @for (n, t) in not_running { li { strong { (n) } ": " (t) } } }
        }
        h2 { "Recent reports" }
        @if d.recent_reports.is_empty() { p.quiet { "None since the hub started." } }
        table.reports {
            @for r in &d.recent_reports {
                tr {
                    td { (when(r.at)) @if r.reports > 1 { " … " (when(r.last_at)) " (" (r.reports) " reports)" } }
                    td { "generation " (r.applied_generation) }
                    td { (r.summary) }
                }
            }
        }
        h2 { "Telemetry" }
        @if streams.is_empty() { p.quiet { "No telemetry from this device yet." } }
        @for s in streams {
            div.stream {
                h3 { (s.stream) " " span.quiet { (s.records) " records, " (s.gaps) " gaps" } }
                @for (name, v) in &s.metrics {
                    div.metric {
                        span.mname { (name) } " "
                        @if let Some(points) = s.points.get(name) { (sparkline(points)) }
                        " " span.mval { (v) }
                    }
                }
            }
        }
        @if let Some(entries) = audit {
            h2 { "Audit entries about this device" }
            (audit_table(entries))
        }
    };
    page(f, "/devices", &format!("Device {}", d.id), None, body)
}

fn workload_class(state: &str) -> &'static str {
    match state {
        "running" => "ok",
        "failed" | "backing-off" => "bad",
        "held-by-geofence" => "warn",
        "exited" => "off",
        _ => "busy",
    }
}

/// A sparkline of values (an inline SVG polyline, no script).
pub fn sparkline(points: &[f64]) -> Markup {
    let (w, h) = (120.0, 24.0);
    let finite: Vec<f64> = points.iter().copied().filter(|p| p.is_finite()).collect();
    if finite.len() < 2 {
        return html! {};
    }
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let step = w / (finite.len() - 1) as f64;
    let pts: Vec<String> = finite
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "{:.1},{:.1}",
                i as f64 * step,
                h - 2.0 - (v - lo) / span * (h - 4.0)
            )
        })
        .collect();
    html! {
        svg.spark viewBox=(format!("0 0 {w} {h}")) width=(w) height=(h) role="img"
            aria-label=(format!("min {lo}, max {hi}")) {
            polyline points=(pts.join(" ")) {}
        }
    }
}

// ---- Releases and deployments ---------------------------------------------------------------------------------

pub fn releases(f: &Frame<'_>, rows: &[Release]) -> Markup {
    let body = html! {
        table.releases {
            thead { tr { th { "Release" } th { "Version" } th { "Epoch" } th { "Size" } th { "Precompiled" } th { "Digest" } th { "Pushed" } } }
            tbody {
                @for r in rows {
                    tr {
                        td { a href=(format!("/releases/{}", urlencode(&r.digest))) { (r.name) } } td { (r.version) } td { (r.epoch) } td { (r.size) " B" }
                        td { @if r.precompiled.is_empty() { "—" } @else { (r.precompiled.join(", ")) } }
                        td { code title=(r.digest) { (r.digest.get(..12).unwrap_or(&r.digest)) } }
                        td { (when(r.created_at)) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.quiet { "No releases yet (" code { "flotilla release push" } ")." } }
    };
    page(f, "/releases", "Releases", None, body)
}

/// One release: what the devices verify before they run it.
pub fn release(f: &Frame<'_>, r: &Release, running_on: Option<usize>) -> Markup {
    let body = html! {
        dl {
            dt { "Name" } dd { (r.name) }
            dt { "Version" } dd { (r.version) }
            dt { "Epoch" } dd { (r.epoch) " (devices refuse releases below the highest epoch they have run)" }
            dt { "Release digest" } dd { code { (r.digest) } }
            dt { "Artifact digest" } dd { code { (r.artifact) } }
            dt { "Artifact size" } dd { (r.size) " bytes" }
            dt { "Precompiled for" } dd { @if r.precompiled.is_empty() { "— (devices compile the module themselves)" } @else { (r.precompiled.join(", ")) } }
            dt { "Pushed" } dd { (when(r.created_at)) }
            @if let Some(n) = running_on {
                dt { "Running on" } dd { a href=(format!("/devices?version={}", urlencode(&r.version))) { (n) " devices run version " (r.version) } }
            }
        }
    };
    page(
        f,
        "/releases",
        &format!("Release {} {}", r.name, r.version),
        None,
        body,
    )
}

/// What an apply from the console did: the revision, or the API's refusal (shown inline, as the CLI shows it).
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    Applied { deployment: String, revision: u64 },
    Refused(String),
}

pub fn deployments(
    f: &Frame<'_>,
    rows: &[Deployment],
    can_act: bool,
    outcome: Option<&ApplyOutcome>,
    spec: &str,
) -> Markup {
    let body = html! {
        table.deployments {
            thead { tr { th { "Deployment" } th { "Revision" } th { "Workloads" } th { "Placed" } th { "Running" } } }
            tbody {
                @for d in rows {
                    tr {
                        td { a href=(format!("/deployments/{}", urlencode(&d.name))) { (d.name) } }
                        td { (d.revision.map_or_else(|| "—".into(), |r| r.to_string())) }
                        td { (d.workloads.join(", ")) }
                        td { (d.placed) } td { (d.running) }
                    }
                }
            }
        }
        @if rows.is_empty() { p.quiet { "No deployments." } }
        @if can_act {
            h2 { "Apply a spec" }
            @match outcome {
                Some(ApplyOutcome::Applied { deployment, revision }) => p.ok role="status" {
                    "Applied " a href=(format!("/deployments/{}", urlencode(deployment))) { (deployment) } " as revision " (revision) "."
                },
                Some(ApplyOutcome::Refused(e)) => pre.error role="alert" { (e) },
                None => {}
            }
            form.apply method="post" action="/deployments" enctype="multipart/form-data" {
                input type="hidden" name="csrf" value=(f.csrf);
                label { "Spec (TOML) " textarea name="spec" rows="14" cols="80" { (spec) } }
                label { "or upload a file " input type="file" name="file" accept=".toml,text/plain"; }
                button type="submit" { "Apply" }
            }
        }
    };
    page(f, "/deployments", "Deployments", None, body)
}

pub fn deployment(
    f: &Frame<'_>,
    d: &Deployment,
    shown: Option<(u64, &str)>,
    diff: Option<&Diff>,
) -> Markup {
    let revs: Vec<u64> = d.revisions.iter().map(|r| r.revision).collect();
    let body = html! {
        p { (d.placed) " devices placed, " (d.running) " running every workload. "
            a href=(format!("/rollouts/{}", urlencode(&d.name))) { "Rollout" } }
        h2 { "Revisions" }
        table.revisions {
            thead { tr { th { "Revision" } th { "Applied" } th {} } }
            tbody {
                @for r in d.revisions.iter().rev() {
                    tr {
                        td { a href=(format!("/deployments/{}?rev={}", urlencode(&d.name), r.revision)) { (r.revision) } }
                        td { (when(r.at)) }
                        td { @if let Some(prev) = revs.iter().copied().filter(|p| *p < r.revision).max() {
                            a href=(format!("/deployments/{}?from={prev}&to={}", urlencode(&d.name), r.revision)) { "diff with " (prev) }
                        } }
                    }
                }
            }
        }
        @if let Some(x) = diff {
            h2 { "Changes from revision " (x.from) " to " (x.to) }
            @if x.changes.is_empty() { p.quiet { "No change in meaning." } }
            ul { @for c in &x.changes { li { (c) } } }
            pre.diff { @for line in x.unified.lines() {
                span class=[diff_class(line)] { (line) } "\n"
            } }
        }
        @if let Some((rev, spec)) = shown {
            h2 { "Spec at revision " (rev) }
            pre.spec { (spec) }
        }
        h2 { "Devices" }
        table.placed {
            thead { tr { th { "Device" } th { "Online" } @for w in &d.workloads { th { (w) } } } }
            tbody {
                @for p in d.devices.iter().take(200) {
                    tr {
                        td { a href=(format!("/devices/{}", urlencode(&p.device))) { (p.device) } }
                        td { @if p.online { "yes" } @else { "no" } }
                        @for s in &p.workloads { td { span class=(format!("badge {}", workload_class(&s.state))) { (s.state) } } }
                    }
                }
            }
        }
        @if d.devices.len() > 200 {
            p.quiet { "First 200 of " (d.devices.len()) "; " a href="/devices" { "the device list" } " filters and pages them all." }
        }
    };
    page(
        f,
        "/deployments",
        &format!("Deployment {}", d.name),
        None,
        body,
    )
}

fn diff_class(line: &str) -> Option<&'static str> {
    if line.starts_with("+++") || line.starts_with("---") {
        None
    } else if line.starts_with('+') {
        Some("add")
    } else if line.starts_with('-') {
        Some("del")
    } else {
        None
    }
}

// ---- Rollouts -------------------------------------------------------------------------------------------------

pub fn rollouts(f: &Frame<'_>, rows: &[RolloutRow]) -> Markup {
    let body = html! {
        table.rollouts {
            thead { tr { th { "Deployment" } th { "Phase" } th { "Devices" } th { "Started" } th { "Status counts" } } }
            tbody {
                @for r in rows {
                    tr {
                        td { a href=(format!("/rollouts/{}", urlencode(&r.deployment))) { (r.deployment) } }
                        td { (r.phase) @if r.paused { " (paused)" } }
                        td { (r.devices) " in " (r.waves) " waves" }
                        td { (when(r.started_at)) }
                        td { @for (k, n) in &r.counts { (k) ": " (n) " " } }
                    }
                }
            }
        }
        @if rows.is_empty() { p.quiet { "No rollouts. A rollout starts when a deployment with a " code { "[rollout]" } " section changes its release." } }
    };
    page(f, "/rollouts", "Rollouts", None, body)
}

/// What Abort does, in one sentence, beside its button.
pub const ABORT_TEXT: &str = "Abort stops the rollout now: no further device is updated, and every device already \
on the new release (including those mid-update) is rolled back to the previous release.";

/// The live fragments of a rollout page, by the name its stream sends them under.
pub fn rollout_fragments(
    r: &Rollout,
    rep: &Report,
    csrf: Option<&str>,
) -> Vec<(&'static str, String)> {
    vec![
        ("state", rollout_state(r, rep).into_string()),
        ("actions", rollout_actions(r, csrf).into_string()),
        ("waves", rollout_waves(r).into_string()),
        ("history", rollout_history(r, rep).into_string()),
    ]
}

pub fn rollout(
    f: &Frame<'_>,
    r: &Rollout,
    rep: &Report,
    can_act: bool,
    flash: Option<&str>,
) -> Markup {
    let fragments = rollout_fragments(r, rep, can_act.then_some(f.csrf));
    let url = format!(
        "/events/rollouts/{}?seen={}",
        urlencode(&r.deployment),
        seen(&fragments)
    );
    let body = html! {
        @if let Some(m) = flash { p.error role="alert" { (m) } }
        (live_fragments(&fragments))
    };
    page(
        f,
        "/rollouts",
        &format!("Rollout of {}", r.deployment),
        Some(&url),
        body,
    )
}

/// Each fragment in its swap target (`id` and `sse-swap` named after it).
fn live_fragments(fragments: &[(&'static str, String)]) -> Markup {
    html! {
        @for (name, html) in fragments {
            div id=(format!("live-{name}")) sse-swap=(name) { (PreEscaped(html)) }
        }
    }
}

/// What the page shows, as the stream's starting point (`name:hash,...`): the stream then sends only fragments
/// that differ from it, from its very first event.
pub fn seen(fragments: &[(&'static str, String)]) -> String {
    fragments
        .iter()
        .map(|(name, html)| format!("{name}:{:016x}", fingerprint(html)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A fragment's fingerprint: FNV-1a over its HTML (stable across processes and releases, unlike std's hasher).
pub fn fingerprint(html: &str) -> u64 {
    html.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn action_form(
    csrf: &str,
    deployment: &str,
    action: &str,
    label: &str,
    remark: Option<&str>,
) -> Markup {
    html! {
        form.inline.action method="post" action=(format!("/rollouts/{}/{action}", urlencode(deployment))) {
            input type="hidden" name="csrf" value=(csrf);
            @if let Some(name) = remark {
                input type="text" name=(name) placeholder="remark (recorded with the approval)" size="30" maxlength="500";
            }
            button type="submit" name="action" value=(action) class=(format!("btn-{action}")) { (label) }
        }
    }
}

/// Phase, pause, soak countdown, windows, the last gate.
pub fn rollout_state(r: &Rollout, rep: &Report) -> Markup {
    html! {
        dl.rollout-state {
            dt { "Phase" } dd.phase { (r.phase) @if r.paused { " " span.badge.warn { "paused" } } }
            @if let Some(left) = r.soak_left_secs {
                dt { "Soak" } dd.soak { (duration(left)) " left of " (duration(r.soak_secs)) }
            }
            @if !r.windows.is_empty() {
                dt { "Maintenance windows" }
                dd { @for w in &r.windows { (w.region) ": " @if w.open { span.badge.ok { "open" } } @else { span.badge.off { "closed" } } " " } }
            }
            dt { "Failure threshold" } dd { "abort above " (format!("{:.0}", r.max_failure_ratio * 100.0)) "% failed in a wave" }
            @if let Some(g) = rep.gates.last() {
                dt { "Last gate" }
                dd.gate { @if g.passed { span.badge.ok { "passed" } } @else { span.badge.bad { "halted" } } " wave " (g.wave + 1) ": " (g.detail) }
            }
            @if r.finished && !rep.outcome.is_empty() { dt { "Outcome" } dd { (rep.outcome) } }
        }
    }
}

/// The actions the phase allows, for an operator (`csrf` given): a fragment of its own, live, so Approve appears
/// when the rollout starts waiting for it, and unchanged (so not swapped under a half-typed remark) while the
/// phase stays.
pub fn rollout_actions(r: &Rollout, csrf: Option<&str>) -> Markup {
    html! {
        @if let Some(csrf) = csrf.filter(|_| !r.finished) {
            section.actions {
                h2 { "Actions" }
                @if r.paused {
                    (action_form(csrf, &r.deployment, "resume", "Resume", None))
                } @else {
                    (action_form(csrf, &r.deployment, "pause", "Pause", None))
                }
                @if r.phase.starts_with("awaiting approval") {
                    (action_form(csrf, &r.deployment, "approve", "Approve", Some("remark")))
                }
                (action_form(csrf, &r.deployment, "abort", "Abort", None))
                p.abort-note { (ABORT_TEXT) }
            }
        }
    }
}

/// One row per wave with its progress bar; the devices of the current wave listed.
pub fn rollout_waves(r: &Rollout) -> Markup {
    html! {
        h2 { "Waves" }
        table.waves {
            thead { tr { th { "Wave" } th { "Devices" } th.progress-col { "Progress" } th { "Pending" } th { "Updating" } th { "Healthy" } th { "Failed" } th { "Held" } } }
            tbody {
                @for w in &r.waves {
                    @let p = WaveProgress::of(&w.devices);
                    tr.wave data-wave=(w.wave) class=[(r.current_wave == Some(w.wave)).then_some("current")] {
                        td { (w.wave) }
                        td { (p.total()) }
                        td { (progress_bar(&p)) }
                        td.pending { (p.pending) } td.updating { (p.updating) } td.healthy { (p.healthy) }
                        td.failed { (p.failed) } td.held { (p.held) }
                    }
                }
            }
        }
        @if let Some(cur) = r.current_wave.and_then(|c| r.waves.iter().find(|w| w.wave == c)) {
            details open {
                summary { "Devices of wave " (cur.wave) }
                ul.wave-devices {
                    @for d in cur.devices.iter().take(100) {
                        li { a href=(format!("/devices/{}", urlencode(&d.device))) { (d.device) } ": " (d.status.as_deref().unwrap_or("pending"))
                            @if let Some(x) = &d.detail { " — " (x) } @if let Some(s) = &d.stage { " (" (s) ")" } }
                    }
                }
            }
        }
        @if !r.left_out.is_empty() {
            p.quiet { (r.left_out.len()) " devices left out (the release failed on them before; " code { "flotilla rollout retry" } ")." }
        }
    }
}

/// A bar of five segments whose widths are the shares of each status (an SVG, so no inline style is needed).
fn progress_bar(p: &WaveProgress) -> Markup {
    let total = p.total().max(1) as f64;
    let mut x = 0.0;
    let segs: Vec<(&str, f64, f64)> = [
        ("healthy", p.healthy),
        ("updating", p.updating),
        ("held", p.held),
        ("failed", p.failed),
        ("pending", p.pending),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(c, n)| {
        let w = n as f64 / total * 100.0;
        let seg = (c, x, w);
        x += w;
        seg
    })
    .collect();
    html! {
        svg.bar viewBox="0 0 100 6" preserveAspectRatio="none" role="img"
            aria-label=(format!("{} healthy, {} updating, {} held, {} failed, {} pending", p.healthy, p.updating, p.held, p.failed, p.pending)) {
            @for (c, x, w) in segs { rect class=(format!("seg-{c}")) x=(format!("{x:.2}")) y="0" width=(format!("{w:.2}")) height="6" {} }
        }
    }
}

pub fn rollout_history(r: &Rollout, rep: &Report) -> Markup {
    html! {
        h2 { "Gates" }
        @if rep.gates.is_empty() { p.quiet { "No gate evaluated yet." } }
        ul.gates { @for g in &rep.gates {
            li { (when(g.at)) " wave " (g.wave + 1) ": " @if g.passed { "passed" } @else { "halted" } " (" (g.failed) " failed, " (g.undetermined) " undetermined of " (g.judged) ") " (g.detail) }
        } }
        h2 { "History" }
        ol.history { @for h in r.history.iter().rev().take(50) { li { span.t { (when(h.at)) } " " (h.event) } } }
    }
}

// ---- Audit ----------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    pub who: String,
    pub action: String,
    pub q: String,
}

pub fn audit(f: &Frame<'_>, rows: &[AuditEntry], q: &AuditQuery) -> Markup {
    let body = html! {
        form.filters method="get" action="/audit" {
            label { "Who " input name="who" value=(q.who) size="12"; }
            label { "Action " input name="action" value=(q.action) size="12" placeholder="denied, apply, rollout..."; }
            label { "Text " input name="q" value=(q.q) size="20"; }
            button type="submit" { "Filter" }
            " " a href="/audit?action=denied" { "denied attempts" }
        }
        (audit_table(rows))
    };
    page(f, "/audit", "Audit log", None, body)
}

fn audit_table(rows: &[AuditEntry]) -> Markup {
    html! {
        table.audit {
            thead { tr { th { "When" } th { "Who" } th { "Action" } th { "Detail" } } }
            tbody { @for e in rows {
                tr class=[(e.action == "denied").then_some("denied")] { td { (when(e.at)) } td { (e.who) } td { (e.action) } td { (e.detail) } }
            } }
        }
        @if rows.is_empty() { p.quiet { "No entries." } }
    }
}

/// Percent-encodes a query or path component.
pub fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
