//! A minimal HTTP-over-unix-socket client that test container images carry (busybox has none): it plays the
//! workload calling the host API at `/run/flotilla/api.sock`.
//!
//! Usage: `api-client METHOD PATH [BODY]` (socket from `FLOTILLA_API`, default `/run/flotilla/api.sock`).
//! Prints the status line; exits 0 on 2xx.

use std::io::{Read, Write};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(method), Some(path)) = (args.first(), args.get(1)) else {
        eprintln!("usage: api-client METHOD PATH [BODY]");
        std::process::exit(2);
    };
    let body = args.get(2).cloned().unwrap_or_default();
    let socket =
        std::env::var("FLOTILLA_API").unwrap_or_else(|_| "/run/flotilla/api.sock".to_owned());
    let mut s = match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("connect {socket}: {e}");
            std::process::exit(1);
        }
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: flotilla\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut resp = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut resp).is_err() {
        std::process::exit(1);
    }
    let status = resp.lines().next().unwrap_or_default().to_owned();
    println!("{status}");
    let ok = status.split(' ').nth(1).is_some_and(|c| c.starts_with('2'));
    std::process::exit(if ok { 0 } else { 1 });
}
