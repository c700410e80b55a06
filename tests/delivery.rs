//! Alert delivery end to end: alerts committed by the batch path
//! (`Store::commit_batch`, as the pipeline does), a real `keywatch serve`
//! dispatching them, and real receivers: a Python HTTP server that checks
//! webhook signatures with the `standardwebhooks` library and Slack's Block
//! Kit shape, and an aiosmtpd SMTP server.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::receivers::{SmtpOptions, SmtpReceiver, WebhookReceiver};
use common::services::{start_serve, Database};
use detectors::{Action, Alert, AlertKind, BudgetInfo, Severity};
use serde_json::{json, Value};
use storage::{BatchCommit, Store};

/// What the receiver knows; keywatch signs with an old and this new secret (rotation).
const NEW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_dGhlIG9sZCBzZWNyZXQgYmVpbmcgcm90YXRlZCBvdXQ=";

/// Commits alerts through the batch path, one batch per call.
struct Writer {
    rt: tokio::runtime::Runtime,
    store: Store,
    next: i64,
}

impl Writer {
    fn new(db: &Database) -> Writer {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = rt.block_on(async {
            let s = Store::connect(&db.url, 2).await.unwrap();
            s.migrate().await.unwrap();
            s
        });
        Writer { rt, store, next: 0 }
    }

    fn commit(&mut self, alerts: &[Alert]) {
        let batch = BatchCommit {
            topic: "gateway-events",
            partition: 0,
            start_offset: self.next,
            next_offset: self.next + 1,
            rollups: &[],
            flush: true,
            rollups_from: None,
            alerts,
            checkpoint: None,
            budgets: &[],
            addresses: &[],
            sources: &[],
        };
        self.rt.block_on(self.store.commit_batch(&batch)).unwrap();
        self.next += 1;
    }
}

fn alert(n: i64, kind: AlertKind, severity: Severity, user: &str, key: &str) -> Alert {
    let ts = 1_795_000_000_000 + n * 1000;
    Alert {
        id: Alert::make_id(kind, &format!("key:{key}"), &format!("test-{n}")),
        kind,
        severity,
        action: if severity == Severity::Critical {
            Action::Block
        } else {
            Action::Notify
        },
        user_id: user.into(),
        key_id: Some(key.into()),
        ip: None,
        ts,
        observed: Some(120.0 + n as f64),
        baseline: Some(4.5),
        threshold: Some(30.0),
        budget: None,
        expires_at: None,
        tier: Some("pro".into()),
        reason: format!(
            "{user} sent {} requests in a minute on {key}, against a usual 4.5 <&> (test {n}).",
            120 + n
        ),
    }
}

fn budget_alert(n: i64, user: &str, percent: u8) -> Alert {
    let mut a = alert(
        n,
        AlertKind::BudgetThreshold,
        Severity::Warning,
        user,
        "key_b",
    );
    a.id = Alert::make_id(
        AlertKind::BudgetThreshold,
        user,
        &format!("day-{percent}-{n}"),
    );
    a.key_id = None;
    a.budget = Some(BudgetInfo {
        period: detectors::time::PeriodKind::Day,
        period_start: 1_794_960_000_000,
        limit_usd: 50.0,
        spent_usd: 50.0 * f64::from(percent) / 100.0,
        percent,
    });
    a.reason = format!(
        "{user} has spent ${:.2} of its $50.00 daily budget ({percent}%).",
        0.5 * f64::from(percent)
    );
    a
}

fn serve_config(dir: &Path, db: &Database, alerting: &str, receivers: &str) -> PathBuf {
    let p = dir.join("keywatch.toml");
    std::fs::write(
        &p,
        format!(
            "[postgres]\nurl = \"{}\"\nmax_connections = 4\n\n[feed]\nlisten = \"\"\n\n[alerting]\nallow_private_addresses = true\npoll_interval_secs = 0.2\n{alerting}\n{receivers}\n",
            db.url
        ),
    )
    .unwrap();
    p
}

fn webhook(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[alerting.receivers]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = \"{OLD_SECRET} {NEW_SECRET}\"\n{extra}\n"
    )
}

/// Rows of `alert_deliveries` for a receiver: alert id -> (state, attempts).
fn deliveries(db: &Database, receiver: &str) -> BTreeMap<String, (String, i64)> {
    db.query(&format!(
        "SELECT alert_id, state, attempts::text FROM alert_deliveries WHERE receiver = '{receiver}'"
    ))
    .into_iter()
    .map(|r| (r[0].clone(), (r[1].clone(), r[2].parse().unwrap())))
    .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids_of(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| {
            r["headers"]["webhook-id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn webhooks_are_signed_retried_and_given_up_as_the_answers_say() {
    let dir = common::scratch("delivery-webhooks");
    let db = Database::create("delivery_webhooks");
    let recv = WebhookReceiver::start(&dir, &[NEW_SECRET]);
    recv.set_mode(
        "flaky",
        json!({"mode": "status", "status": 500, "times": 2}),
    );
    recv.set_mode(
        "limited",
        json!({"mode": "status", "status": 429, "times": 1, "retry_after": "2"}),
    );
    recv.set_mode("gone", json!({"mode": "status", "status": 410}));
    recv.set_mode("bad", json!({"mode": "status", "status": 400}));
    recv.set_mode("moved", json!({"mode": "redirect"}));
    let mut receivers = String::new();
    receivers += &webhook("ok", &recv.url("ok"), "");
    for name in ["flaky", "limited", "bad", "moved"] {
        receivers += &webhook(name, &recv.url(name), "kinds = [\"request_spike\"]");
    }
    // Gone only sees critical alerts, so the operator alert it causes goes elsewhere.
    receivers += &webhook("gone", &recv.url("gone"), "kinds = [\"request_spike\"]");
    let cfg = serve_config(
        &dir,
        &db,
        "retry_schedule_secs = [1, 1, 1]\ntimeout_secs = 10\nlease_secs = 20",
        &receivers,
    );
    let mut w = Writer::new(&db);
    let a1 = alert(
        1,
        AlertKind::RequestSpike,
        Severity::Critical,
        "acct_1",
        "key_1",
    );
    let a2 = alert(
        2,
        AlertKind::RequestSpike,
        Severity::Critical,
        "acct_2",
        "key_2",
    );
    w.commit(&[a1.clone(), a2.clone()]);
    let log = dir.join("serve.log");
    let _serve = start_serve(&cfg, &log, None);

    // ok: each alert once, signed (verified by the standardwebhooks library
    // with only the new secret), webhook-id = alert id, body = the alert contract.
    let got = recv.wait_for(
        |r| r.iter().filter(|x| x["name"] == "ok").count() >= 3,
        Duration::from_secs(30),
    );
    let ok: Vec<&Value> = got.iter().filter(|x| x["name"] == "ok").collect();
    for a in [&a1, &a2] {
        let mine: Vec<&&Value> = ok
            .iter()
            .filter(|x| x["headers"]["webhook-id"] == a.id.as_str())
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "ok got {} deliveries of {}",
            mine.len(),
            a.id
        );
        assert_eq!(mine[0]["verified"], true, "{}", mine[0]);
        assert_eq!(mine[0]["body"], serde_json::to_value(a).unwrap());
        assert_eq!(mine[0]["headers"]["content-type"], "application/json");
        let sigs = mine[0]["headers"]["webhook-signature"].as_str().unwrap();
        assert_eq!(
            sigs.split(' ').filter(|s| s.starts_with("v1,")).count(),
            2,
            "{sigs}"
        );
    }
    // The 410 disabled "gone" and raised an operator alert, delivered to ok.
    let operator: Vec<&&Value> = ok
        .iter()
        .filter(|x| x["body"]["kind"] == "receiver_disabled")
        .collect();
    assert_eq!(operator.len(), 1, "{ok:?}");
    assert!(operator[0]["body"]["reason"]
        .as_str()
        .unwrap()
        .contains("\"gone\""));
    assert_eq!(operator[0]["body"]["severity"], "critical");

    wait_until("every delivery to finish", Duration::from_secs(30), || {
        // gone's deliveries not tried before its 410 are held while it is disabled.
        db.query(
            "SELECT count(*)::text FROM alert_deliveries WHERE state = 'pending' AND receiver <> 'gone'",
        )[0][0]
            == "0"
    });
    let records = recv.records();
    let count = |name: &str, id: &str| {
        records
            .iter()
            .filter(|r| r["name"] == name && r["headers"]["webhook-id"] == id)
            .count()
    };
    // flaky: 500, 500, then 200: retried, and delivered.
    for (id, (state, _)) in deliveries(&db, "flaky") {
        assert_eq!(state, "delivered", "flaky {id}");
    }
    assert_eq!(
        ids_of(&recv.records_for("flaky")).len(),
        4,
        "two 500s and two deliveries"
    );
    // limited: the 429's Retry-After (2 s) was honoured.
    let limited = recv.records_for("limited");
    assert_eq!(limited.len(), 3);
    // The record answered 429 (records of concurrent requests may be logged
    // in either order), then its retry.
    let first = limited
        .iter()
        .find(|r| r["mode"] == "status")
        .expect("one request was answered 429");
    let again = limited
        .iter()
        .find(|r| r["mode"] == "ok" && r["headers"]["webhook-id"] == first["headers"]["webhook-id"])
        .expect("the 429'd alert was sent again");
    let gap = again["received_at"].as_f64().unwrap() - first["received_at"].as_f64().unwrap();
    assert!(gap >= 1.9, "retried {gap:.2} s after a Retry-After of 2 s");
    // bad (400) and moved (302): given up after one attempt; the redirect was not followed.
    for name in ["bad", "moved"] {
        for a in [&a1, &a2] {
            assert_eq!(count(name, &a.id), 1, "{name} {}", a.id);
        }
        for (id, (state, attempts)) in deliveries(&db, name) {
            assert_eq!((state.as_str(), attempts), ("failed", 1), "{name} {id}");
        }
    }
    assert!(
        !records
            .iter()
            .any(|r| r["path"].as_str().unwrap().contains("redirected")),
        "keywatch followed a redirect"
    );
    // gone: disabled, visible to the operator, and nothing more is sent to it.
    let status = db.query("SELECT disabled_reason FROM receiver_status WHERE receiver = 'gone' AND disabled_at IS NOT NULL");
    assert_eq!(status.len(), 1);
    let list = common::keywatch()
        .args(["receivers", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.lines()
            .any(|l| l.starts_with("gone\t") && l.contains("DISABLED")),
        "{list}"
    );
    let attempts = db.query(
        "SELECT outcome, count(*)::text FROM delivery_attempts a JOIN alert_deliveries d ON d.id = a.delivery_id
         WHERE d.receiver = 'flaky' GROUP BY outcome ORDER BY outcome",
    );
    assert_eq!(
        attempts,
        vec![
            vec!["delivered".to_string(), "2".into()],
            vec!["retry".into(), "2".into()]
        ]
    );
    let enable = common::keywatch()
        .args(["receivers", "enable", "gone", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(enable.status.success());
    assert!(db
        .query(
            "SELECT 'x' FROM receiver_status WHERE receiver = 'gone' AND disabled_at IS NOT NULL"
        )
        .is_empty());
    // Nothing was sent to gone after its 410 (two users' sends may have been
    // in flight at once); what it did not get was held, and goes out now.
    let answered_410 = recv.records_for("gone").len();
    assert!(
        (1..=2).contains(&answered_410),
        "{answered_410} requests to gone"
    );
    recv.set_mode("gone", json!({"mode": "ok"}));
    wait_until("gone's held deliveries", Duration::from_secs(30), || {
        db.query("SELECT count(*)::text FROM alert_deliveries WHERE state = 'pending'")[0][0] == "0"
    });
    let gone = deliveries(&db, "gone");
    let failed = gone.values().filter(|(s, _)| s == "failed").count();
    let delivered = gone.values().filter(|(s, _)| s == "delivered").count();
    assert_eq!(
        (failed, delivered),
        (answered_410, 2 - answered_410),
        "{gone:?}"
    );
    wait_until("every outbox row closed", Duration::from_secs(10), || {
        db.query("SELECT count(*)::text FROM alert_outbox WHERE delivered_at IS NULL")[0][0] == "0"
    });
}

#[test]
fn addresses_inside_the_network_are_refused_unless_allowed() {
    let dir = common::scratch("delivery-ssrf");
    let db = Database::create("delivery_ssrf");
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/hook",
        "http://[::1]:9/hook",
        "http://localhost:9/hook",
    ] {
        let cfg = dir.join("ssrf.toml");
        std::fs::write(
            &cfg,
            format!(
                "[postgres]\nurl = \"{}\"\n[feed]\nlisten = \"\"\n{}",
                db.url,
                webhook("internal", url, "")
            ),
        )
        .unwrap();
        let mut child = common::keywatch()
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{url} was accepted: keywatch serve kept running");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!status.success(), "{url} was accepted");
        assert!(
            err.contains("internal") && err.contains("allow_private_addresses"),
            "{url}: {err}"
        );
    }
}

#[test]
fn a_receiver_down_for_a_while_gets_everything_in_order_per_user() {
    let dir = common::scratch("delivery-down");
    let db = Database::create("delivery_down");
    let mut recv = WebhookReceiver::start(&dir, &[NEW_SECRET]);
    recv.stop();
    let cfg = serve_config(
        &dir,
        &db,
        "retry_schedule_secs = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\ntimeout_secs = 10\nlease_secs = 20",
        &webhook("soc", &recv.url("soc"), ""),
    );
    let _serve = start_serve(&cfg, &dir.join("serve.log"), None);
    let mut w = Writer::new(&db);
    let mut sent = vec![];
    for batch in 0..3 {
        let mut alerts = vec![];
        for (i, user) in ["acct_a", "acct_b", "acct_c"].iter().enumerate() {
            let n = batch * 3 + i as i64;
            alerts.push(alert(
                n,
                AlertKind::RequestSpike,
                Severity::Critical,
                user,
                &format!("key_{n}"),
            ));
        }
        w.commit(&alerts);
        sent.extend(alerts);
    }
    wait_until(
        "failed attempts while the receiver is down",
        Duration::from_secs(30),
        || {
            db.query("SELECT count(*)::text FROM delivery_attempts WHERE outcome = 'retry'")[0][0]
                .parse::<i64>()
                .unwrap()
                >= 6
        },
    );
    recv.restart();
    recv.wait_for(|r| r.len() >= sent.len(), Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(2));
    let got = recv.records();
    assert_eq!(
        got.len(),
        sent.len(),
        "each alert exactly once once the receiver is back: {got:?}"
    );
    for r in &got {
        assert_eq!(r["verified"], true);
    }
    for user in ["acct_a", "acct_b", "acct_c"] {
        let want: Vec<&str> = sent
            .iter()
            .filter(|a| a.user_id == user)
            .map(|a| a.id.as_str())
            .collect();
        let seen: Vec<String> = got
            .iter()
            .filter(|r| r["body"]["user_id"] == user)
            .map(|r| r["headers"]["webhook-id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(seen, want, "{user}'s alerts out of order");
    }
    for (id, (state, _)) in deliveries(&db, "soc") {
        assert_eq!(state, "delivered", "{id}");
    }
}

#[test]
fn killing_the_dispatcher_between_send_and_mark_sends_once_more_with_the_same_id() {
    let dir = common::scratch("delivery-kill");
    let db = Database::create("delivery_kill");
    let recv = WebhookReceiver::start(&dir, &[NEW_SECRET]);
    recv.set_mode("soc", json!({"mode": "hang"}));
    let cfg = serve_config(
        &dir,
        &db,
        "retry_schedule_secs = [1, 1, 1]\ntimeout_secs = 20\nlease_secs = 25",
        &webhook("soc", &recv.url("soc"), ""),
    );
    let mut w = Writer::new(&db);
    let hung = alert(
        1,
        AlertKind::LeakedKey,
        Severity::Critical,
        "acct_1",
        "key_1",
    );
    w.commit(std::slice::from_ref(&hung));
    let log = dir.join("serve.log");
    let mut serve = start_serve(&cfg, &log, None);
    recv.wait_for(|r| !r.is_empty(), Duration::from_secs(30));
    // The receiver has the request; the dispatcher has not marked it. Kill it now.
    serve.kill9();
    assert_eq!(deliveries(&db, "soc")[&hung.id], ("pending".to_string(), 1));
    recv.set_mode("soc", json!({"mode": "ok"}));
    let others = [
        alert(
            2,
            AlertKind::LeakedKey,
            Severity::Critical,
            "acct_2",
            "key_2",
        ),
        alert(
            3,
            AlertKind::LeakedKey,
            Severity::Critical,
            "acct_3",
            "key_3",
        ),
    ];
    w.commit(&others);
    let _serve = start_serve(&cfg, &log, None);
    // The lease (25 s) runs out, and the new dispatcher sends the hung one again.
    wait_until("all three delivered", Duration::from_secs(60), || {
        deliveries(&db, "soc")
            .values()
            .all(|(s, _)| s == "delivered")
            && deliveries(&db, "soc").len() == 3
    });
    let ids = ids_of(&recv.records());
    assert_eq!(ids.iter().filter(|i| **i == hung.id).count(), 2, "{ids:?}");
    for a in &others {
        assert_eq!(ids.iter().filter(|i| **i == a.id).count(), 1, "{ids:?}");
    }
    assert_eq!(
        deliveries(&db, "soc")[&hung.id],
        ("delivered".to_string(), 2)
    );
}

#[test]
fn slack_and_email_get_readable_grouped_messages_and_no_repeats() {
    let dir = common::scratch("delivery-human");
    let db = Database::create("delivery_human");
    let recv = WebhookReceiver::start(&dir, &[NEW_SECRET]);
    let smtp = SmtpReceiver::start(
        &dir,
        &SmtpOptions {
            fail_first: 1,
            ..Default::default()
        },
    );
    // The Slack URL is a secret: it must appear in no error, log or table.
    let slack_url = recv.slack_url("T0SECRET-B0SECRET-xoxbSECRET");
    recv.set_mode(
        "T0SECRET-B0SECRET-xoxbSECRET",
        json!({"mode": "status", "status": 503, "times": 1}),
    );
    let receivers = format!(
        "[[alerting.receivers]]\nname = \"oncall\"\ntype = \"slack\"\nurl_env = \"KW_TEST_SLACK_URL\"\n\n\
         [[alerting.receivers]]\nname = \"finance\"\ntype = \"email\"\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\ntls = \"none\"\n\
         from = \"keywatch <alerts@example.com>\"\nto = [\"finance@example.com\"]\nkinds = [\"budget_threshold\", \"request_spike\"]\n",
        smtp.port
    );
    let cfg = serve_config(
        &dir,
        &db,
        "retry_schedule_secs = [1, 1, 1]\ngroup_wait_secs = 3\ntimeout_secs = 5\nlease_secs = 10\ndashboard_url = \"https://grafana.example.com/d/kw?var-user={user_id}\"",
        &receivers,
    );
    let log = dir.join("serve.log");
    let mut child = common::keywatch();
    child
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("KW_TEST_SLACK_URL", &slack_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _serve = common::services::Running(child.spawn().unwrap());
    let mut w = Writer::new(&db);

    // A critical alert goes at once (after Slack's one 503 and SMTP's one 451).
    let crit = alert(
        1,
        AlertKind::RequestSpike,
        Severity::Critical,
        "acct_1",
        "key_1",
    );
    w.commit(std::slice::from_ref(&crit));
    let slack = |recv: &WebhookReceiver| -> Vec<Value> {
        recv.records()
            .into_iter()
            .filter(|r| r["kind"] == "slack" && r["answer"] == 200)
            .collect()
    };
    wait_until(
        "the critical alert on Slack",
        Duration::from_secs(20),
        || slack(&recv).len() == 1,
    );
    let first = &slack(&recv)[0];
    assert_eq!(first["slack_valid"], true, "{first}");
    let text = first["body"].to_string();
    assert!(text.contains("acct_1") && text.contains("key_1"), "{text}");
    assert!(
        text.contains("grafana.example.com/d/kw?var-user=acct_1"),
        "dashboard link: {text}"
    );
    assert!(
        text.contains("&lt;&amp;&gt;"),
        "mrkdwn must be escaped: {text}"
    );
    let mails = smtp.wait_for_count(1, Duration::from_secs(20));
    let m = &mails[0];
    assert!(m["subject"].as_str().unwrap().contains("acct_1"), "{m}");
    assert!(m["text"].as_str().unwrap().contains("acct_1"));
    assert!(m["html"].as_str().unwrap().contains("acct_1"));
    assert_eq!(m["attempt"], 2, "the 451 was retried");

    // Three warnings within the group wait: one message each for Slack and email.
    let warnings: Vec<Alert> = (0..3)
        .map(|u| budget_alert(10 + u, &format!("acct_{}", 10 + u), 80))
        .collect();
    w.commit(&warnings[..1]);
    std::thread::sleep(Duration::from_millis(500));
    w.commit(&warnings[1..]);
    wait_until("the grouped message", Duration::from_secs(20), || {
        slack(&recv).len() == 2
    });
    let grouped = slack(&recv)[1]["body"].to_string();
    for a in &warnings {
        assert!(
            grouped.contains(&a.user_id),
            "{} missing from the group: {grouped}",
            a.user_id
        );
    }
    let mails = smtp.wait_for_count(2, Duration::from_secs(20));
    for a in &warnings {
        assert!(mails[1]["text"].as_str().unwrap().contains(&a.user_id));
    }

    // The same condition again within the repeat interval: recorded, not sent.
    let mut repeat = crit.clone();
    repeat.id = Alert::make_id(AlertKind::RequestSpike, "key:key_1", "test-repeat");
    repeat.ts += 60_000;
    w.commit(std::slice::from_ref(&repeat));
    wait_until("the repeat to be routed", Duration::from_secs(20), || {
        db.query(&format!(
            "SELECT 'x' FROM alert_deliveries WHERE alert_id = '{}' AND state = 'suppressed'",
            repeat.id
        ))
        .len()
            == 2
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(slack(&recv).len(), 2);
    assert_eq!(smtp.messages().len(), 2);

    // The secret Slack URL went nowhere.
    let errors = db.query("SELECT coalesce(string_agg(error, ' '), '') FROM delivery_attempts")[0]
        [0]
    .clone();
    let last = db.query("SELECT coalesce(string_agg(last_error, ' '), '') FROM alert_deliveries")
        [0][0]
        .clone();
    assert!(errors.contains("503"), "the 503 was recorded: {errors}");
    let serve_log = std::fs::read_to_string(&log).unwrap();
    for text in [&errors, &last, &serve_log] {
        assert!(!text.contains("SECRET"), "the Slack URL leaked: {text}");
    }
}
