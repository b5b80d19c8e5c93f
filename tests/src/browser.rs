//! A real browser for the console tests: Debian's `chromedriver` started on a free port (`--port=0`, the port read
//! from its first lines) driving headless Chromium through WebDriver (`fantoccini`). No CDP crate: WebDriver is
//! the stable interface across Chromium releases.

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running chromedriver, killed when dropped.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    pub url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts `chromedriver --port=0` and waits for the line that names its port.
    pub fn start() -> Result<Self> {
        let mut child = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver (apt-get install chromium chromium-driver)")?;
        let out = child.stdout.take().context("chromedriver stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("started successfully on port ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches('.').parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .context("chromedriver did not say which port it listens on")?;
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A new browser session (its own profile, so its own cookies).
    pub async fn session(&self) -> Result<Client> {
        self.session_with(true).await
    }

    /// A new browser session with JavaScript on or off.
    pub async fn session_with(&self, javascript: bool) -> Result<Client> {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--no-first-run", "--window-size=1400,1000"],
                "prefs": { "profile.managed_default_content_settings.javascript": if javascript { 1 } else { 2 } },
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .context("opening a WebDriver session")
    }
}

/// Waits until `f` returns `Some`, polling every 100 ms, up to `patience`.
pub async fn until<T, F, Fut>(what: &str, patience: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > patience {
            bail!("timed out after {patience:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element matching `css`, if any.
pub async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

/// Saves a screenshot of the page as PNG under `target/console-screenshots/`.
pub async fn screenshot(c: &Client, name: &str) -> Result<PathBuf> {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir)?;
    let png = c.screenshot().await.context("screenshot")?;
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png)?;
    Ok(path)
}

/// `target/console-screenshots/` of the workspace.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

/// A plain HTTP/1.1 request outside the browser (a forged form post, a replayed cookie): the status code and
/// the response's head and body as text.
pub fn raw_http(
    addr: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> Result<(u16, String)> {
    let host = addr.trim_start_matches("http://");
    let mut s =
        std::net::TcpStream::connect(host).with_context(|| format!("connecting to {host}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{cookie}Content-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    Ok((status, out))
}

/// An HTTP/1.1 response read in full: status, lower-cased headers, body.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    /// Every value of header `name` (lower case).
    pub fn header_values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request with a `Connection: close`, read to the end.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> Result<RawResponse> {
    let (status, text) = raw_http(addr, method, path, cookie, form)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Chunked bodies are left as they are: callers look for text in them, not at their framing.
    Ok(RawResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

/// The value of cookie `name` among a response's `Set-Cookie` headers.
pub fn set_cookie(r: &RawResponse, name: &str) -> Option<String> {
    r.header_values("set-cookie")
        .filter_map(|c| c.split(';').next())
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Logs in to the console without a browser (the form's CSRF cookie, then the form): the session cookie
/// (`flotilla_session=...`) for further requests.
pub fn console_login(addr: &str, token: &str) -> Result<String> {
    let form = request(addr, "GET", "/login", None, "")?;
    let login_csrf = set_cookie(&form, "flotilla_login").context("no log-in CSRF cookie")?;
    let body = format!("csrf={login_csrf}&token={token}");
    let r = request(
        addr,
        "POST",
        "/login",
        Some(&format!("flotilla_login={login_csrf}")),
        &body,
    )?;
    let session = set_cookie(&r, "flotilla_session").filter(|s| !s.is_empty());
    match (r.status, session) {
        (303, Some(s)) => Ok(format!("flotilla_session={s}")),
        (status, _) => bail!("log-in answered {status}: {}", r.body),
    }
}
