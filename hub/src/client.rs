//! The operator CLI's HTTP client side: every command talks to the hub API with a bearer token.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::Read;

/// Connection settings for the operator CLI.
#[derive(Debug, Clone)]
pub struct Client {
    pub server: String,
    pub token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(server: &str, token: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A hub that does not answer is an error the operator sees, not a CLI that hangs forever.
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .build()
            .into();
        Self {
            server: server.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent,
        }
    }

    fn finish(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Value> {
        let mut resp = resp.context("contacting the hub")?;
        let status = resp.status();
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .context("reading the response")?;
        if !status.is_success() {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("detail").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or(text);
            bail!(
                "{} {}: {detail}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).context("parsing the response")
    }

    /// GET returning the raw body text (for `/metrics`).
    pub fn get_text(&self, path: &str) -> Result<String> {
        let mut resp = self
            .agent
            .get(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .context("contacting the hub")?;
        let mut text = String::new();
        resp.body_mut()
            .as_reader()
            .read_to_string(&mut text)
            .context("reading the response")?;
        if !resp.status().is_success() {
            bail!("{}: {text}", resp.status().as_u16());
        }
        Ok(text)
    }

    /// GET of a server-sent-events stream: calls `on_event(event, data)` for each event until it returns false or
    /// the hub closes the stream. No overall timeout (a tail runs until stopped).
    pub fn get_events(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> bool,
    ) -> Result<()> {
        use std::io::BufRead;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let resp = agent
            .get(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "text/event-stream")
            .call();
        let mut resp = resp.context("contacting the hub")?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Self::finish(Ok(resp)).and_then(|_| bail!("{}", status.as_u16()));
        }
        let reader = std::io::BufReader::new(resp.body_mut().as_reader());
        let (mut event, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.context("reading the event stream")?;
            if line.is_empty() {
                if !data.is_empty()
                    && !on_event(if event.is_empty() { "message" } else { &event }, &data)
                {
                    return Ok(());
                }
                event.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .get(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        Self::finish(r)
    }

    pub fn post(
        &self,
        path: &str,
        content_type: &str,
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> Result<Value> {
        let mut req = self
            .agent
            .post(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", content_type);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        Self::finish(req.send(body))
    }

    /// POSTs a large body, showing upload progress on stderr when it is a terminal.
    pub fn upload(&self, path: &str, body: Vec<u8>) -> Result<Value> {
        let reader = Progress {
            data: std::io::Cursor::new(body),
            shown: 0,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        };
        let resp = self
            .agent
            .post(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(ureq::SendBody::from_owned_reader(reader));
        Self::finish(resp)
    }

    pub fn delete(&self, path: &str) -> Result<Value> {
        let r = self
            .agent
            .delete(format!("{}{path}", self.server))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        Self::finish(r)
    }
}

/// A reader that reports how much of an upload has been sent (every 5 %, on a terminal only).
struct Progress {
    data: std::io::Cursor<Vec<u8>>,
    shown: u64,
    tty: bool,
}

impl Read for Progress {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        let total = self.data.get_ref().len() as u64;
        let pos = self.data.position();
        if self.tty && total > 0 && (pos * 20 / total > self.shown || pos == total) {
            self.shown = pos * 20 / total;
            eprint!(
                "\r  uploaded {:>5.1} % of {} bytes",
                pos as f64 * 100.0 / total as f64,
                total
            );
            if pos == total {
                eprintln!();
            }
        }
        Ok(n)
    }
}
