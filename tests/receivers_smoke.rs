//! The delivery tests' receivers work, without keywatch's dispatcher:
//! signatures made here by hand are checked by the `standardwebhooks`
//! package in the webhook receiver, its modes answer as configured, Slack
//! payloads are validated, and the SMTP receiver parses what a raw SMTP
//! dialogue sends.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use common::receivers::{http, http_timeout, SmtpOptions, SmtpReceiver, WebhookReceiver};
use common::scratch;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_c2VjcmV0LXRoYXQtd2FzLXJvdGF0ZWQtb3V0LTEyMzQ=";
const WRONG_SECRET: &str = "whsec_d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldC0xMjM0NQ==";

/// A Standard Webhooks signature, `v1,BASE64(HMAC-SHA256(key, "id.ts.body"))`,
/// written here by hand.
fn sign(secret: &str, id: &str, ts: u64, body: &str) -> String {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.{body}").as_bytes());
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// POSTs `body` to `/hook/NAME` with Standard Webhooks headers.
fn post_signed(
    r: &WebhookReceiver,
    name: &str,
    id: &str,
    signature: &str,
    body: &str,
) -> common::receivers::HttpResponse {
    let ts = now().to_string();
    http(
        r.port,
        "POST",
        &format!("/hook/{name}"),
        &[
            ("Content-Type", "application/json"),
            ("webhook-id", id),
            ("webhook-timestamp", &ts),
            ("webhook-signature", signature),
            ("User-Agent", "receivers-smoke"),
        ],
        body.as_bytes(),
    )
    .unwrap()
}

#[test]
fn hand_written_signature_matches_the_spec_vector() {
    // The Standard Webhooks reference example.
    assert_eq!(
        sign(
            SECRET,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
}

#[test]
fn webhook_signatures_are_verified_independently() {
    let dir = scratch("recv-sig");
    let r = WebhookReceiver::start(&dir, &[SECRET, OLD_SECRET]);
    let body =
        json!({"id": "alert-1", "kind": "budget_threshold", "reason": "über budget"}).to_string();

    // Good, by either configured secret, and among several signatures.
    let ts = now();
    let good = sign(SECRET, "alert-1", ts, &body);
    let resp = post_signed(&r, "x", "alert-1", &good, &body);
    assert_eq!(resp.status, 200);
    post_signed(
        &r,
        "x",
        "alert-2",
        &sign(OLD_SECRET, "alert-2", now(), &body),
        &body,
    );
    post_signed(
        &r,
        "x",
        "alert-3",
        &format!(
            "{} {}",
            sign(WRONG_SECRET, "alert-3", now(), &body),
            sign(SECRET, "alert-3", now(), &body)
        ),
        &body,
    );
    // Bad: a wrong key, a signature for other bytes, no signature at all.
    post_signed(
        &r,
        "x",
        "alert-4",
        &sign(WRONG_SECRET, "alert-4", now(), &body),
        &body,
    );
    post_signed(
        &r,
        "x",
        "alert-5",
        &sign(SECRET, "alert-5", now(), &body),
        &body.replace("alert-1", "alert-9"),
    );
    http(r.port, "POST", "/hook/x", &[], body.as_bytes()).unwrap();

    let recs = r.wait_for(|v| v.len() == 6, Duration::from_secs(5));
    let verified: Vec<&Value> = recs.iter().map(|v| &v["verified"]).collect();
    assert_eq!(
        verified,
        [true, true, true, false, false, false]
            .map(Value::Bool)
            .iter()
            .collect::<Vec<_>>(),
        "{recs:#?}"
    );
    assert!(recs[3]["verify_error"]
        .as_str()
        .unwrap()
        .contains("No matching signature"));
    assert!(recs[5]["verify_error"]
        .as_str()
        .unwrap()
        .contains("Missing required headers"));
    let first = &recs[0];
    assert_eq!(first["path"], "/hook/x");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["answer"], 200);
    assert_eq!(first["body"]["reason"], "über budget");
    assert_eq!(first["headers"]["webhook-id"], "alert-1");
    assert_eq!(first["headers"]["webhook-timestamp"], ts.to_string());
    assert_eq!(first["headers"]["webhook-signature"], good);
    assert_eq!(first["headers"]["user-agent"], "receivers-smoke");
    assert!(first["received_at"].as_f64().unwrap() > 1.6e9);
    // The JSON-lines log holds the same records.
    let lines = std::fs::read_to_string(&r.log).unwrap();
    assert_eq!(lines.lines().count(), 6);
}

#[test]
fn modes_answer_as_configured_and_restart_keeps_the_log() {
    let dir = scratch("recv-modes");
    let mut r = WebhookReceiver::start(&dir, &[SECRET]);
    let port = r.port;
    let post = |name: &str| http(port, "POST", &format!("/hook/{name}"), &[], b"{}").unwrap();

    r.set_mode(
        "x",
        json!({"mode": "status", "status": 429, "times": 1, "retry_after": "2"}),
    );
    let first = post("x");
    assert_eq!(first.status, 429);
    assert_eq!(first.header("retry-after"), Some("2"));
    assert_eq!(post("x").status, 200);

    r.set_mode("e", json!({"mode": "status", "status": 500}));
    assert_eq!(post("e").status, 500);
    assert_eq!(post("e").status, 500);
    // Other names are unaffected.
    assert_eq!(post("x").status, 200);

    r.set_mode("r", json!({"mode": "redirect"}));
    let redirect = post("r");
    assert_eq!(redirect.status, 302);
    assert_eq!(redirect.header("location"), Some("/hook/r-redirected"));

    // A hanging request is recorded, never answered, and the receiver still
    // serves other requests meanwhile.
    r.set_mode("h", json!({"mode": "hang"}));
    let hung = std::thread::spawn(move || {
        http_timeout(
            port,
            "POST",
            "/hook/h",
            &[],
            b"{}",
            Duration::from_millis(800),
        )
    });
    r.wait_for(
        |v| v.iter().any(|x| x["name"] == "h"),
        Duration::from_secs(5),
    );
    assert_eq!(post("x").status, 200);
    assert!(
        hung.join().unwrap().is_err(),
        "a hanging request got an answer"
    );

    let answers: Vec<Value> = r.records().iter().map(|v| v["answer"].clone()).collect();
    assert_eq!(
        answers,
        vec![
            json!(429),
            json!(200),
            json!(500),
            json!(500),
            json!(200),
            json!(302),
            Value::Null,
            json!(200)
        ]
    );

    // Down, then back on the same port: modes reset, records kept.
    r.stop();
    assert!(http(port, "GET", "/_health", &[], b"").is_err());
    assert_eq!(
        r.records().len(),
        8,
        "records are read from the log while down"
    );
    r.restart();
    assert_eq!(r.port, port);
    assert_eq!(post("e").status, 200);
    assert_eq!(r.records().len(), 9);
}

#[test]
fn slack_payloads_are_validated() {
    let dir = scratch("recv-slack");
    let r = WebhookReceiver::start(&dir, &[]);
    let valid = json!({
        "text": "acct_42 has spent $40.12 of its $50.00 daily budget (80%).",
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": "Budget 80%: acct_42"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": "*acct_42* spent $40.12"},
             "fields": [{"type": "mrkdwn", "text": "*Severity*\nwarning"}]},
            {"type": "divider"},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": "keywatch"}]},
            {"type": "actions", "elements": [{"type": "button",
                "text": {"type": "plain_text", "text": "Open"}, "url": "https://example.test/a/1"}]}
        ]
    });
    let invalid = json!({
        "text": "",
        "blocks": [
            {"type": "header", "text": {"type": "mrkdwn", "text": "x".repeat(151)}},
            {"type": "table"}
        ]
    });
    let ok = http(
        r.port,
        "POST",
        "/slack/team",
        &[],
        valid.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!((ok.status, ok.text().as_str()), (200, "ok"));
    let bad = http(
        r.port,
        "POST",
        "/slack/team",
        &[],
        invalid.to_string().as_bytes(),
    )
    .unwrap();
    assert_eq!((bad.status, bad.text().as_str()), (400, "invalid_blocks"));

    let recs = r.records_for("team");
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["slack_valid"], true, "{:#?}", recs[0]);
    assert_eq!(recs[0]["verified"], Value::Null);
    assert_eq!(recs[1]["slack_valid"], false);
    let errors: Vec<&str> = recs[1]["slack_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(errors.iter().any(|e| e.starts_with("text")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("151 chars")), "{errors:?}");
    assert!(errors.iter().any(|e| e.contains("'table'")), "{errors:?}");
}

/// A raw SMTP session.
struct Smtp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Smtp {
    fn connect(port: u16) -> Smtp {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut smtp = Smtp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        assert_eq!(smtp.reply().0, 220);
        smtp
    }

    /// One (possibly multi-line) reply.
    fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(line.len() >= 4, "short SMTP reply {line:?}");
            text.push_str(&line);
            if line.as_bytes()[3] == b' ' {
                return (line[..3].parse().unwrap(), text);
            }
        }
    }

    fn cmd(&mut self, line: &str) -> (u16, String) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
        self.reply()
    }

    /// MAIL, RCPT, DATA and the dot-stuffed message; the final reply.
    fn send(&mut self, from: &str, to: &str, message: &str) -> (u16, String) {
        assert_eq!(self.cmd(&format!("MAIL FROM:<{from}>")).0, 250);
        assert_eq!(self.cmd(&format!("RCPT TO:<{to}>")).0, 250);
        assert_eq!(self.cmd("DATA").0, 354);
        let mut data = String::new();
        for line in message.lines() {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
            data.push_str("\r\n");
        }
        data.push_str(".\r\n");
        self.writer.write_all(data.as_bytes()).unwrap();
        self.reply()
    }
}

fn multipart() -> String {
    let html = "<p><b>acct_42</b> has spent 80% of its budget.</p>";
    format!(
        "From: keywatch <keywatch@example.test>\n\
         To: oncall@example.test\n\
         Subject: =?utf-8?q?keywatch=3A_budget_80=25_=E2=80=94_acct=5F42?=\n\
         Message-ID: <alert-1@keywatch.example.test>\n\
         MIME-Version: 1.0\n\
         Content-Type: multipart/alternative; boundary=\"BOUNDARY\"\n\
         \n\
         --BOUNDARY\n\
         Content-Type: text/plain; charset=utf-8\n\
         Content-Transfer-Encoding: quoted-printable\n\
         \n\
         acct_42 has spent 80% of its budget =E2=82=AC.\n\
         .a line starting with a dot\n\
         --BOUNDARY\n\
         Content-Type: text/html; charset=utf-8\n\
         Content-Transfer-Encoding: base64\n\
         \n\
         {}\n\
         --BOUNDARY--\n",
        B64.encode(html)
    )
}

#[test]
fn smtp_receiver_parses_messages_and_defers_the_first() {
    let dir = scratch("recv-smtp");
    let r = SmtpReceiver::start(
        &dir,
        &SmtpOptions {
            fail_first: 1,
            ..Default::default()
        },
    );
    let mut s = Smtp::connect(r.port);
    assert_eq!(s.cmd("HELO smoke.test").0, 250);
    let msg = multipart();
    let (code, text) = s.send("keywatch@example.test", "oncall@example.test", &msg);
    assert_eq!(code, 451, "{text}");
    assert!(text.contains("4.3.0"), "{text}");
    let (code, text) = s.send("keywatch@example.test", "oncall@example.test", &msg);
    assert_eq!(code, 250, "{text}");
    assert_eq!(s.cmd("QUIT").0, 221);

    let m = r.wait_for_count(1, Duration::from_secs(5));
    assert_eq!(m.len(), 1);
    let m = &m[0];
    assert_eq!(m["subject"], "keywatch: budget 80% — acct_42");
    assert_eq!(m["mail_from"], "keywatch@example.test");
    assert_eq!(m["rcpt_tos"], json!(["oncall@example.test"]));
    assert_eq!(m["message_id"], "<alert-1@keywatch.example.test>");
    assert_eq!(m["content_type"], "multipart/alternative");
    assert_eq!(m["attempt"], 2);
    let text = m["text"].as_str().unwrap();
    assert!(text.contains("80% of its budget €."), "{text}");
    assert!(text.contains("\n.a line starting with a dot"), "{text}");
    assert_eq!(
        m["html"].as_str().unwrap().trim(),
        "<p><b>acct_42</b> has spent 80% of its budget.</p>"
    );
    assert!(m["raw_size"].as_u64().unwrap() > 300);
}

#[test]
fn smtp_receiver_auth_and_reject() {
    let dir = scratch("recv-smtp-auth");
    let r = SmtpReceiver::start(
        &dir,
        &SmtpOptions {
            auth: Some(("alerts".into(), "s3cret".into())),
            ..Default::default()
        },
    );
    let mut s = Smtp::connect(r.port);
    let (code, ehlo) = s.cmd("EHLO smoke.test");
    assert_eq!(code, 250);
    assert!(ehlo.contains("AUTH") && ehlo.contains("PLAIN"), "{ehlo}");
    assert_eq!(s.cmd("MAIL FROM:<a@example.test>").0, 530);
    let bad = B64.encode("\0alerts\0wrong");
    assert_eq!(s.cmd(&format!("AUTH PLAIN {bad}")).0, 535);
    let good = B64.encode("\0alerts\0s3cret");
    assert_eq!(s.cmd(&format!("AUTH PLAIN {good}")).0, 235);
    assert_eq!(
        s.send("a@example.test", "b@example.test", &multipart()).0,
        250
    );
    let m = r.wait_for_count(1, Duration::from_secs(5));
    assert_eq!(m[0]["auth_user"], "alerts");

    let rejecting = SmtpReceiver::start(
        &dir,
        &SmtpOptions {
            reject: true,
            ..Default::default()
        },
    );
    let mut s = Smtp::connect(rejecting.port);
    assert_eq!(s.cmd("HELO smoke.test").0, 250);
    let (code, text) = s.send("a@example.test", "b@example.test", &multipart());
    assert_eq!(code, 550, "{text}");
    assert!(text.contains("5.7.1"), "{text}");
    assert!(rejecting.messages().is_empty());
}
