//! Real receivers for the delivery tests: an HTTP server for signed webhooks
//! and Slack posts (`tests/receivers/webhook_receiver.py`, which checks
//! signatures with the `standardwebhooks` package, independently of
//! keywatch's Rust code) and an SMTP server
//! (`tests/receivers/smtp_receiver.py`, aiosmtpd). Each runs as a Python
//! process on a free loopback port and is killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::services::free_port;

/// The Python interpreter for the receivers: `KEYWATCH_PYTHON`, else
/// `python3`; panics when it lacks the packages they need.
pub fn python3() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let py: PathBuf = std::env::var_os("KEYWATCH_PYTHON")
                .map(Into::into)
                .unwrap_or_else(|| "python3".into());
            match Command::new(&py)
                .args(["-c", "import aiosmtpd, standardwebhooks"])
                .output()
            {
                Ok(o) if o.status.success() => py,
                Ok(o) => panic!(
                    "{} lacks the test receivers' packages: run `bash scripts/install-test-python` ({})",
                    py.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => panic!(
                    "cannot run {} ({e}): install Python 3 and run `bash scripts/install-test-python`",
                    py.display()
                ),
            }
        })
        .clone()
}

/// A receiver script in `tests/receivers/`.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/receivers")
        .join(name)
}

/// An HTTP response from [`http`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names are lower-case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// A minimal blocking HTTP/1.1 request to `127.0.0.1:port` (one connection,
/// `Connection: close`), with a 30 s read timeout.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    http_timeout(port, method, path, headers, body, Duration::from_secs(30))
}

/// [`http`] with a read timeout: a receiver in `hang` mode makes it fail
/// with `WouldBlock`/`TimedOut` after `timeout`.
pub fn http_timeout(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if let Some(n) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(n);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// Sends SIGTERM and waits up to 5 s; SIGKILL after that.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads a JSON-lines file (a missing file is empty; a last line still
/// being written is skipped).
fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// The end of a log file, for panic messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    text[start..].to_string()
}

/// Pretty JSON of `records`, shortened, for panic messages.
fn show(records: &[Value]) -> String {
    let s = serde_json::to_string_pretty(records).unwrap();
    if s.len() > 8000 {
        let mut end = 8000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} records)", &s[..end], records.len())
    } else {
        s
    }
}

/// The webhook/Slack receiver (`tests/receivers/webhook_receiver.py`).
///
/// Requests to [`url`](Self::url) (`/hook/NAME`) are verified as Standard
/// Webhooks with the configured secrets; requests to
/// [`slack_url`](Self::slack_url) (`/slack/NAME`) are checked as Slack Block
/// Kit payloads. Every such request is a record (see [`records`](Self::records)):
/// `{"path", "name", "kind": "hook"|"slack", "method", "received_at",
/// "headers": {webhook-id, webhook-timestamp, webhook-signature,
/// content-type, user-agent}, "body", "verified", "verify_error",
/// "slack_valid", "slack_errors", "mode", "answer"}`.
pub struct WebhookReceiver {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The JSON-lines log of every request (kept across [`restart`](Self::restart)).
    pub log: PathBuf,
    stderr: PathBuf,
    secrets: Vec<String>,
}

impl WebhookReceiver {
    /// Starts a receiver on a free port that accepts signatures by any of
    /// `secrets` (`whsec_...`), and waits until it answers.
    pub fn start(dir: &Path, secrets: &[&str]) -> WebhookReceiver {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut r = WebhookReceiver {
                child: None,
                port,
                log: dir.join(format!("webhook-receiver-{port}.jsonl")),
                stderr: dir.join(format!("webhook-receiver-{port}.stderr")),
                secrets: secrets.iter().map(|s| s.to_string()).collect(),
            };
            match r.spawn() {
                Ok(()) => return r,
                // Another process took the free port in between: try another.
                Err(e) => last = e,
            }
        }
        panic!("the webhook receiver did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let mut child = Command::new(python3())
            .arg(script("webhook_receiver.py"))
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--log")
            .arg(&self.log)
            .env("WEBHOOK_RECEIVER_SECRETS", self.secrets.join(" "))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting the webhook receiver");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("it exited with {status}: {}", tail(&self.stderr)));
            }
            if let Ok(r) = http_timeout(
                self.port,
                "GET",
                "/_health",
                &[],
                b"",
                Duration::from_secs(2),
            ) {
                if r.status == 200 {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "no answer on port {} after 20 s: {}",
                    self.port,
                    tail(&self.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The webhook endpoint for `name`: `http://127.0.0.1:PORT/hook/NAME`.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/hook/{name}", self.port)
    }

    /// The Slack endpoint for `name`: `http://127.0.0.1:PORT/slack/NAME`.
    pub fn slack_url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/slack/{name}", self.port)
    }

    /// Sets how requests to `name` are answered, e.g. `json!({"mode": "ok"})`,
    /// `json!({"mode": "status", "status": 429, "times": 2, "retry_after": "1"})`,
    /// `json!({"mode": "redirect"})`, `json!({"mode": "slow", "seconds": 3})`,
    /// `json!({"mode": "hang"})`, `json!({"mode": "drop"})`.
    pub fn set_mode(&self, name: &str, mode: Value) {
        let r = http(
            self.port,
            "POST",
            &format!("/_mode/{name}"),
            &[("Content-Type", "application/json")],
            mode.to_string().as_bytes(),
        )
        .expect("setting a receiver mode");
        assert_eq!(r.status, 200, "set_mode({name}, {mode}): {}", r.text());
    }

    /// Replaces the accepted secrets (kept by [`restart`](Self::restart)).
    pub fn set_secrets(&mut self, secrets: &[&str]) {
        self.secrets = secrets.iter().map(|s| s.to_string()).collect();
        let body = serde_json::json!({ "secrets": self.secrets }).to_string();
        let r = http(self.port, "POST", "/_secrets", &[], body.as_bytes())
            .expect("setting the receiver's secrets");
        assert_eq!(r.status, 200, "{}", r.text());
    }

    /// Every request recorded so far, oldest first (across restarts). While
    /// the receiver is stopped, read from its log file.
    pub fn records(&self) -> Vec<Value> {
        if self.child.is_none() {
            return read_jsonl(&self.log);
        }
        let r = http(self.port, "GET", "/_log", &[], b"").expect("reading the receiver's log");
        assert_eq!(r.status, 200, "{}", r.text());
        match r.json() {
            Value::Array(v) => v,
            other => panic!("/_log is not a list: {other}"),
        }
    }

    /// The records of requests to `name` (hook or Slack).
    pub fn records_for(&self, name: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["name"] == name)
            .collect()
    }

    /// Polls [`records`](Self::records) until `pred` holds for them, and
    /// returns them; panics (showing them) after `timeout`.
    pub fn wait_for(&self, pred: impl Fn(&[Value]) -> bool, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records();
            if pred(&records) {
                return records;
            }
            if Instant::now() > deadline {
                panic!(
                    "the webhook receiver did not see what was expected within {timeout:?}; it has:\n{}",
                    show(&records)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the receiver process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s); requests then get
    /// "connection refused".
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Kills it at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it if it runs, then starts it again on the same port with the
    /// same log file (records are kept) and every mode reset to `ok`.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "the webhook receiver did not restart on port {}: {e}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How an [`SmtpReceiver`] behaves.
#[derive(Debug, Clone, Default)]
pub struct SmtpOptions {
    /// Answer `451 4.3.0 try again later` to the first N DATA commands.
    pub fail_first: u32,
    /// Answer `550 5.7.1 rejected` to every DATA command.
    pub reject: bool,
    /// Require AUTH PLAIN/LOGIN (without TLS) with this user and password.
    pub auth: Option<(String, String)>,
}

/// The SMTP receiver (`tests/receivers/smtp_receiver.py`). Each accepted
/// message is one record (see [`messages`](Self::messages)):
/// `{"mail_from", "rcpt_tos", "received_at", "subject", "message_id",
/// "from", "to", "text", "html", "content_type", "raw_size", "attempt",
/// "auth_user"}`, where `text`/`html` are the decoded parts and `attempt`
/// counts the DATA commands the server had received (1-based).
pub struct SmtpReceiver {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The JSON-lines file of accepted messages.
    pub out: PathBuf,
    stderr: PathBuf,
}

impl SmtpReceiver {
    /// Starts a receiver on a free port and waits for its `220` greeting.
    pub fn start(dir: &Path, opts: &SmtpOptions) -> SmtpReceiver {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let out = dir.join(format!("smtp-receiver-{port}.jsonl"));
            let stderr = dir.join(format!("smtp-receiver-{port}.stderr"));
            let mut cmd = Command::new(python3());
            cmd.arg(script("smtp_receiver.py"))
                .arg("--port")
                .arg(port.to_string())
                .arg("--out")
                .arg(&out)
                .arg("--fail-first")
                .arg(opts.fail_first.to_string());
            if opts.reject {
                cmd.arg("--reject");
            }
            if let Some((user, password)) = &opts.auth {
                cmd.args(["--user", user, "--password", password]);
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .expect("starting the SMTP receiver");
            let deadline = Instant::now() + Duration::from_secs(20);
            let ready = loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!("it exited with {status}: {}", tail(&stderr));
                    break false;
                }
                if greets(port) {
                    break true;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = format!("no greeting on port {port} after 20 s: {}", tail(&stderr));
                    break false;
                }
                std::thread::sleep(Duration::from_millis(30));
            };
            if ready {
                return SmtpReceiver {
                    child: Some(child),
                    port,
                    out,
                    stderr,
                };
            }
        }
        panic!("the SMTP receiver did not start: {last}");
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every accepted message so far, oldest first.
    pub fn messages(&self) -> Vec<Value> {
        read_jsonl(&self.out)
    }

    /// Polls until at least `n` messages were accepted and returns them;
    /// panics (showing the server's log) after `timeout`.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            if Instant::now() > deadline {
                panic!(
                    "the SMTP receiver got {} of {n} messages within {timeout:?}:\n{}\nits log:\n{}",
                    m.len(),
                    show(&m),
                    tail(&self.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }
}

impl Drop for SmtpReceiver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether an SMTP server on `port` sends its `220` greeting.
fn greets(port: u16) -> bool {
    let Ok(s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let ok = BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("220");
    let _ = (&s).write_all(b"QUIT\r\n");
    ok
}
