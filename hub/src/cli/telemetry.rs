//! `flotilla telemetry query` (a device's history, paged or downsampled) and `flotilla telemetry tail` (accepted
//! records live, over the API's server-sent events).

use super::{Conn, print_json, s};
use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Unix seconds from `30s`, `15m`, `2h`, `7d` ago, or a Unix time as it is.
pub fn parse_time(text: &str, now: u64) -> Result<u64> {
    let unit = |c: char| match c {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3600),
        'd' => Some(86_400),
        _ => None,
    };
    let last = text.chars().last().context("empty time")?;
    match unit(last) {
        Some(mult) => {
            let n: u64 = text[..text.len() - 1]
                .parse()
                .with_context(|| format!("{text:?}: use 30s, 15m, 2h, 7d or Unix seconds"))?;
            Ok(now.saturating_sub(n.saturating_mul(mult)))
        }
        None => text
            .parse()
            .with_context(|| format!("{text:?}: use 30s, 15m, 2h, 7d or Unix seconds")),
    }
}

/// RFC 3339 (UTC) for a Unix time.
pub(super) fn when(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// A record's value on one line: strings bare, everything else as compact JSON.
fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub struct QueryArgs {
    pub device: String,
    pub stream: String,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: usize,
    pub step: Option<u64>,
}

/// Prints up to `limit` records of a stream, oldest first, following the API's pages; or, with `step`, the
/// stream's metrics per bucket.
pub fn query(a: QueryArgs, conn: &Conn) -> Result<()> {
    let client = conn.client()?;
    let now = crate::hub::unix_now();
    let mut params = vec![format!("stream={}", a.stream)];
    if let Some(t) = &a.since {
        params.push(format!("since={}", parse_time(t, now)?));
    }
    if let Some(t) = &a.until {
        params.push(format!("until={}", parse_time(t, now)?));
    }
    let base = format!("/api/v1/devices/{}/telemetry", a.device);
    if let Some(step) = a.step {
        params.push(format!("step={step}"));
        let v = client.get(&format!("{base}?{}", params.join("&")))?;
        if conn.json() {
            print_json(&v["buckets"]);
            return Ok(());
        }
        outln!(
            "{:<22} {:>7}  METRICS (min/mean/max)",
            "BUCKET (UTC)",
            "RECORDS"
        );
        for b in v["buckets"].as_array().map_or(&[][..], Vec::as_slice) {
            let metrics: Vec<String> = b["metrics"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, s)| {
                            format!(
                                "{k}={}/{:.3}/{}",
                                s["min"],
                                s["mean"].as_f64().unwrap_or(0.0),
                                s["max"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            outln!(
                "{:<22} {:>7}  {}",
                when(b["t"].as_u64().unwrap_or(0)),
                s(b, "records"),
                metrics.join("  ")
            );
        }
        return Ok(());
    }
    if a.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let mut records = Vec::new();
    let mut after: Option<u64> = None;
    while records.len() < a.limit {
        let page = (a.limit - records.len()).min(1000);
        let mut p = params.clone();
        p.push(format!("limit={page}"));
        if let Some(x) = after {
            p.push(format!("after={x}"));
        }
        let v = client.get(&format!("{base}?{}", p.join("&")))?;
        if v["history"] == "off" {
            bail!("this hub keeps no telemetry history (serve --telemetry-history-secs 0)");
        }
        records.extend(v["records"].as_array().cloned().unwrap_or_default());
        match v["next_after"].as_u64() {
            Some(x) => after = Some(x),
            None => break,
        }
    }
    if conn.json() {
        print_json(&Value::Array(records));
        return Ok(());
    }
    outln!(
        "{:>8}  {:<20}  {:<8}  VALUE",
        "SEQ",
        "DEVICE TIME (UTC)",
        "TYPE"
    );
    for r in &records {
        outln!(
            "{:>8}  {:<20}  {:<8}  {}",
            s(r, "seq"),
            when(r["device_time"].as_u64().unwrap_or(0)),
            s(r, "type"),
            value_text(&r["value"])
        );
    }
    Ok(())
}

/// Follows accepted records as they arrive until interrupted. `-o json` prints one JSON record per line.
pub fn tail(
    region: Option<&str>,
    device: Option<&str>,
    stream: Option<&str>,
    conn: &Conn,
) -> Result<()> {
    let client = conn.client()?;
    let params: Vec<String> = [("region", region), ("device", device), ("stream", stream)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
    let json = conn.json();
    client.get_events(
        &format!("/api/v1/telemetry/tail?{}", params.join("&")),
        |event, data| {
            match event {
                "record" if json => outln!("{data}"),
                "record" => {
                    let Ok(r) = serde_json::from_str::<Value>(data) else {
                        return true;
                    };
                    outln!(
                        "{}  {}/{}  {}  #{}  {}",
                        when(r["device_time"].as_u64().unwrap_or(0)),
                        r["region"]
                            .as_str()
                            .unwrap_or(flotilla_shared::topics::NO_REGION),
                        s(&r, "device"),
                        s(&r, "stream"),
                        s(&r, "seq"),
                        value_text(&r["value"])
                    );
                }
                "lagged" => eprintln!("warning: fell behind; {data} records not shown"),
                _ => {}
            }
            true
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_relative_or_absolute() {
        let now = 1_000_000;
        let cases = [
            ("30s", Some(999_970)),
            ("15m", Some(999_100)),
            ("2h", Some(992_800)),
            ("7d", Some(395_200)),
            ("1700000000", Some(1_700_000_000)),
            ("", None),
            ("1w", None),
            ("h", None),
            ("-5m", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_time(text, now).ok(), want, "{text:?}");
        }
    }
}
