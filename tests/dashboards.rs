//! The Grafana dashboards in `dashboards/` against a real database: a
//! simulated trace goes through a real `keywatch run` (tansu broker,
//! Postgres, tiny budgets so budget alerts and blocks exist, two webhook
//! receivers so deliveries exist), then every panel query and every
//! template-variable query of every dashboard is expanded the way Grafana
//! expands it (template variables in the browser, then the PostgreSQL data
//! source's macros) and run. Each must succeed, and over the trace's time
//! range with every variable at "All" each panel must show data. Also
//! checked: the dashboards' uids and titles, unique panel ids, and that
//! every panel and variable uses the provisioned data source.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::check::*;
use common::services::*;
use common::*;
use serde_json::Value;

/// The data source every panel must use (dashboards/provisioning/datasources/keywatch.yaml).
const DATASOURCE_UID: &str = "keywatch-postgres";
const DATASOURCE_TYPE: &str = "grafana-postgresql-datasource";
/// The dashboards that must exist.
const DASHBOARD_UIDS: [&str; 3] = ["keywatch-overview", "keywatch-budgets", "keywatch-abuse"];
/// Panels that may legitimately show nothing over the test trace:
/// (dashboard uid, panel title). None today.
const MAY_BE_EMPTY: &[(&str, &str)] = &[];

/// The simulator's first instant: 2026-11-23T00:00:00Z (the sim crate).
const TRACE_START: i64 = 1_795_392_000;
/// The trace's hours.
const TRACE_HOURS: f64 = 6.0;
/// Grafana's default data points per panel (about the panel's width in pixels).
const MAX_DATA_POINTS: i64 = 1000;

#[test]
fn every_dashboard_query_runs_and_shows_data() {
    let started = Instant::now();
    let dashboards = load_dashboards();
    let mut failures = Vec::new();
    for d in &dashboards {
        check_basics(d, &mut failures);
    }
    check_provisioning(&mut failures);
    assert!(
        failures.is_empty(),
        "dashboard problems:\n{}",
        failures.join("\n")
    );

    let db = fill_database();
    eprintln!(
        "database filled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Ok(keep) = std::env::var("KEYWATCH_DASHBOARDS_KEEP_DB") {
        keep_copy(&db, &keep);
    }
    let pg = Pg::connect(&db.url);

    // The trace's range (plus an hour each side), where every panel must
    // show data; and a wide one (a coarser $__interval), where queries must
    // only run.
    let tight = TimeRange::new(
        TRACE_START - 3600,
        TRACE_START + (TRACE_HOURS * 3600.0) as i64 + 3600,
    );
    let wide = TimeRange::new(TRACE_START - 29 * 86_400, TRACE_START + 86_400);
    let mut queries = 0;
    for d in &dashboards {
        queries += check_queries(&pg, d, &tight, &wide, &mut failures);
    }
    assert!(
        failures.is_empty(),
        "{} dashboard quer{} failed:\n\n{}",
        failures.len(),
        if failures.len() == 1 { "y" } else { "ies" },
        failures.join("\n\n")
    );
    eprintln!(
        "{} dashboards, {queries} queries, all ran; {:.1} s in all",
        dashboards.len(),
        started.elapsed().as_secs_f64()
    );
}

// The database --------------------------------------------------------------

/// Runs a simulated trace through `keywatch run` into a fresh database, with
/// budgets small enough that users cross 50/80/100% and get blocked, and two
/// webhook receivers (one accepting, one rejecting leaked-key alerts).
fn fill_database() -> Database {
    let lines = trace(300, TRACE_HOURS, 21, 0);
    let exp = expected(&lines, 2);
    let dir = scratch("dashboards");
    let broker = Broker::start(&dir.join("tansu.log"));
    broker.create_topic("gw", 2);
    broker.create_topic("gw-dlq", 1);
    broker.produce("gw", 2, &lines);
    let db = Database::create("dashboards");
    let hook = webhook_server();
    let extra = format!(
        "[privacy]\nhash_key = \"{HASH_KEY}\"\n\
         [engine.tiers.free]\nrequests_per_minute = 10\ntokens_per_day = 10000\nmax_output_tokens = 500\ndaily_budget_usd = 0.002\n\
         [engine.tiers.pro]\nrequests_per_minute = 60\ntokens_per_day = 100000\nmax_output_tokens = 4000\ndaily_budget_usd = 0.02\n\
         [engine.tiers.enterprise]\nrequests_per_minute = 300\ntokens_per_day = 1000000\nmax_output_tokens = 8000\ndaily_budget_usd = 0.2\n\
         [alerting]\nallow_private_addresses = true\npoll_interval_secs = 0.2\n\
         [[alerting.receivers]]\nname = \"soc-webhook\"\ntype = \"webhook\"\nurl = \"http://{hook}/ok\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n\
         [[alerting.receivers]]\nname = \"audit-webhook\"\ntype = \"webhook\"\nurl = \"http://{hook}/reject\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nkinds = [\"leaked_key\"]\n"
    );
    let cfg = run_config(&dir, &broker, "gw", &db, &extra);
    let log = dir.join("run.log");
    let mut run = start_run(&cfg, &log);
    wait_committed(&db, "gw", &exp.ends, Duration::from_secs(300));
    // Every alert routed and every delivery finished (the receivers answer at once).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = db.query(
            "SELECT (SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL)::text, \
             (SELECT count(*) FROM alert_deliveries)::text",
        );
        if left[0][0] == "0" && left[0][1] != "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries did not finish ({} outbox rows pending, {} deliveries); see {}",
            left[0][0],
            left[0][1],
            log.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_run(&mut run);
    db
}

/// A minimal HTTP server for the webhook receivers: `/ok` answers 204, any
/// other path 400 (a rejection: the delivery is given up). Returns `HOST:PORT`.
fn webhook_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = answer(conn);
            });
        }
    });
    addr
}

fn answer(conn: std::net::TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let path = request_line.split(' ').nth(1).unwrap_or("");
    let status = if path == "/ok" {
        "204 No Content"
    } else {
        "400 Bad Request"
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    conn.flush()
}

/// Copies the filled database to `name` (for working on the dashboards
/// against real data: point a Grafana at it).
fn keep_copy(db: &Database, name: &str) {
    let (base, source) = db.url.rsplit_once('/').unwrap();
    let admin = Pg::connect(&format!("{base}/postgres"));
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name} TEMPLATE {source}"),
    ] {
        admin.run(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    eprintln!("kept a copy of the database as {base}/{name}");
}

/// One connection, running queries as Grafana does (one statement, text results).
struct Pg {
    rt: tokio::runtime::Runtime,
    conn: std::cell::RefCell<sqlx::PgConnection>,
}

/// Rows of a result: column names, and each cell as text (None: NULL).
struct Rows {
    columns: Vec<String>,
    rows: Vec<Vec<Option<String>>>,
}

impl Pg {
    fn connect(url: &str) -> Pg {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let conn = rt.block_on(async {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            sqlx::raw_sql("SET statement_timeout = '60s'")
                .execute(&mut c)
                .await
                .unwrap();
            c
        });
        Pg {
            rt,
            conn: std::cell::RefCell::new(conn),
        }
    }

    fn run(&self, sql: &str) -> Result<Rows, sqlx::Error> {
        use sqlx::{Column, Row, ValueRef};
        let mut conn = self.conn.borrow_mut();
        // The simple query protocol, as Grafana's driver sends a raw query:
        // results come back as text, whatever their types.
        let rows = self.rt.block_on(sqlx::raw_sql(sql).fetch_all(&mut *conn))?;
        let columns = rows
            .first()
            .map(|r| r.columns().iter().map(|c| c.name().to_string()).collect())
            .unwrap_or_default();
        let rows = rows
            .iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        let v = r.try_get_raw(i).unwrap();
                        if v.is_null() {
                            None
                        } else {
                            Some(v.as_str().unwrap_or("<binary>").to_string())
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Rows { columns, rows })
    }
}

// The dashboards ------------------------------------------------------------

struct Dashboard {
    file: PathBuf,
    json: Value,
}

impl Dashboard {
    fn uid(&self) -> &str {
        self.json["uid"].as_str().unwrap_or("")
    }

    fn name(&self) -> String {
        format!(
            "{} ({})",
            self.json["title"].as_str().unwrap_or("?"),
            self.file.file_name().unwrap().to_string_lossy()
        )
    }

    /// Every panel, those nested in (collapsed) rows included.
    fn panels(&self) -> Vec<&Value> {
        fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
            for p in panels.as_array().into_iter().flatten() {
                out.push(p);
                walk(&p["panels"], out);
            }
        }
        let mut out = Vec::new();
        walk(&self.json["panels"], &mut out);
        out
    }

    fn variables(&self) -> Vec<&Value> {
        self.json["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .collect()
    }
}

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

/// Every `dashboards/*.json`.
fn load_dashboards() -> Vec<Dashboard> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("the dashboards directory")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let dashboards: Vec<Dashboard> = files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap();
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
            Dashboard { file, json }
        })
        .collect();
    let uids: Vec<&str> = dashboards.iter().map(Dashboard::uid).collect();
    for want in DASHBOARD_UIDS {
        assert!(
            uids.contains(&want),
            "no dashboard has uid {want} (found {uids:?})"
        );
    }
    let unique: HashSet<&str> = uids.iter().copied().collect();
    assert_eq!(unique.len(), uids.len(), "dashboard uids repeat: {uids:?}");
    dashboards
}

/// A data source reference: must be the provisioned one.
fn check_datasource(what: &str, ds: &Value, failures: &mut Vec<String>) {
    let uid = ds["uid"].as_str().unwrap_or("");
    let ty = ds["type"].as_str().unwrap_or("");
    if uid != DATASOURCE_UID || ty != DATASOURCE_TYPE {
        failures.push(format!(
            "{what}: data source is {ds}, not {{\"type\": \"{DATASOURCE_TYPE}\", \"uid\": \"{DATASOURCE_UID}\"}}"
        ));
    }
}

fn check_basics(d: &Dashboard, failures: &mut Vec<String>) {
    let name = d.name();
    for field in ["uid", "title"] {
        if d.json[field].as_str().unwrap_or("").trim().is_empty() {
            failures.push(format!("{name}: no {field}"));
        }
    }
    if d.json["schemaVersion"].as_i64().is_none() {
        failures.push(format!("{name}: no schemaVersion"));
    }
    let (mut ids, mut titles) = (HashSet::new(), HashSet::new());
    for p in d.panels() {
        let title = p["title"].as_str().unwrap_or("");
        let what = format!("{name}, panel \"{title}\"");
        match p["id"].as_i64() {
            Some(id) if !ids.insert(id) => failures.push(format!("{what}: panel id {id} repeats")),
            Some(_) => {}
            None => failures.push(format!("{what}: no panel id")),
        }
        if p["type"] == "row" {
            continue;
        }
        // Failures name panels by title: each must say which one.
        if title.is_empty() {
            failures.push(format!("{name}: panel {} has no title", p["id"]));
        } else if !titles.insert(title) {
            failures.push(format!("{what}: another panel has this title"));
        }
        check_datasource(&what, &p["datasource"], failures);
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if targets.is_empty() {
            failures.push(format!("{what}: no queries"));
        }
        for t in targets {
            let what = format!("{what}, query {}", t["refId"]);
            if !t["datasource"].is_null() {
                check_datasource(&what, &t["datasource"], failures);
            }
            if t["rawSql"].as_str().unwrap_or("").trim().is_empty() {
                failures.push(format!("{what}: no rawSql"));
            }
            if !matches!(t["format"].as_str(), Some("table" | "time_series")) {
                failures.push(format!(
                    "{what}: format {} (want table or time_series)",
                    t["format"]
                ));
            }
        }
    }
    for v in d.variables() {
        if v["type"] == "query" {
            let what = format!("{name}, variable ${}", v["name"].as_str().unwrap_or("?"));
            check_datasource(&what, &v["datasource"], failures);
        }
    }
}

/// The provisioning files name the same data source.
fn check_provisioning(failures: &mut Vec<String>) {
    let ds = dashboards_dir().join("provisioning/datasources/keywatch.yaml");
    let text = std::fs::read_to_string(&ds).unwrap_or_default();
    for want in [
        format!("uid: {DATASOURCE_UID}"),
        format!("type: {DATASOURCE_TYPE}"),
    ] {
        if !text.contains(&want) {
            failures.push(format!("{}: no `{want}`", ds.display()));
        }
    }
    let provider = dashboards_dir().join("provisioning/dashboards/keywatch.yaml");
    if !std::fs::read_to_string(&provider)
        .unwrap_or_default()
        .contains("type: file")
    {
        failures.push(format!("{}: no file provider", provider.display()));
    }
}

// Running the queries -------------------------------------------------------

/// A dashboard time range, in Unix seconds.
struct TimeRange {
    from: i64,
    to: i64,
}

impl TimeRange {
    fn new(from: i64, to: i64) -> TimeRange {
        TimeRange { from, to }
    }

    fn label(&self) -> String {
        format!("{} to {}", rfc3339(self.from), rfc3339(self.to))
    }
}

/// A template variable's value in one scenario: what replaces `$name`.
type Values = BTreeMap<String, String>;

/// Runs every variable query and every panel query of `d`; returns how many ran.
fn check_queries(
    pg: &Pg,
    d: &Dashboard,
    tight: &TimeRange,
    wide: &TimeRange,
    failures: &mut Vec<String>,
) -> usize {
    let name = d.name();
    let mut ran = 0;
    // Variables, in order (a later one may use an earlier one), each at "All"
    // for the ones after it; remember some real values for the scenarios.
    let mut all = Values::new();
    let mut picks: Vec<(String, String)> = Vec::new();
    for v in d.variables() {
        let var = v["name"].as_str().unwrap_or("?").to_string();
        let mut options = Vec::new();
        if v["type"] == "query" {
            let sql = match &v["query"] {
                Value::String(s) => s.clone(),
                q => q["rawSql"].as_str().unwrap_or("").to_string(),
            };
            for (range, is_tight) in [(tight, true), (wide, false)] {
                let what = format!("{name}, variable ${var}, {}", range.label());
                ran += 1;
                match expand(&sql, &all, range, MAX_DATA_POINTS, None) {
                    Err(e) => failures.push(format!("{what}: {e}\n{sql}")),
                    Ok(q) => match pg.run(&q) {
                        Err(e) => failures.push(format!("{what}: {e}\n{q}")),
                        Ok(rows) if is_tight => {
                            options = rows
                                .rows
                                .iter()
                                .filter_map(|r| r.first().cloned().flatten())
                                .collect();
                            if options.is_empty() {
                                failures.push(format!("{what}: no values\n{q}"));
                            }
                        }
                        Ok(_) => {}
                    },
                }
            }
        } else if let Some(opts) = v["options"].as_array() {
            options = opts
                .iter()
                .filter_map(|o| o["value"].as_str())
                .filter(|o| *o != "$__all")
                .map(str::to_string)
                .collect();
        }
        let quoted = |vals: &[String]| {
            if v["multi"] == true || v["includeAll"] == true {
                vals.iter()
                    .map(|s| format!("'{}'", s.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(",")
            } else {
                vals.first()
                    .map(|s| s.replace('\'', "''"))
                    .unwrap_or_default()
            }
        };
        let all_value = if v["includeAll"] == true {
            match v["allValue"].as_str() {
                // A custom all value goes in as it is, unformatted.
                Some(a) if !a.is_empty() => a.to_string(),
                _ => quoted(&options),
            }
        } else {
            quoted(&options[..options.len().min(1)])
        };
        if !options.is_empty() {
            let n = if v["multi"] == true { 2 } else { 1 };
            picks.push((var.clone(), quoted(&options[..options.len().min(n)])));
        }
        all.insert(var, all_value);
    }

    // Scenarios: every variable at All; then each at one or two real values.
    let mut scenarios: Vec<(String, Values, bool)> =
        vec![("all variables at All".into(), all.clone(), true)];
    for (var, value) in picks {
        let mut vals = all.clone();
        vals.insert(var.clone(), value.clone());
        scenarios.push((format!("${var} = {value}"), vals, false));
    }

    for p in d.panels() {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?");
        let min_interval = p["interval"].as_str();
        let may_be_empty = MAY_BE_EMPTY.contains(&(d.uid(), title));
        for t in p["targets"].as_array().into_iter().flatten() {
            let sql = t["rawSql"].as_str().unwrap_or("");
            let series = t["format"] == "time_series";
            for (scenario, vals, must_show) in &scenarios {
                for (range, is_tight) in [(tight, true), (wide, false)] {
                    let what = format!(
                        "{name}, panel \"{title}\", query {}, {scenario}, {}",
                        t["refId"].as_str().unwrap_or("?"),
                        range.label()
                    );
                    ran += 1;
                    let q = match expand(sql, vals, range, MAX_DATA_POINTS, min_interval) {
                        Ok(q) => q,
                        Err(e) => {
                            failures.push(format!("{what}: {e}\n{sql}"));
                            continue;
                        }
                    };
                    let rows = match pg.run(&q) {
                        Ok(rows) => rows,
                        Err(e) => {
                            failures.push(format!("{what}: {e}\n{q}"));
                            continue;
                        }
                    };
                    if series {
                        if let Err(e) = check_series(&rows) {
                            failures.push(format!("{what}: {e}\n{q}"));
                        }
                    }
                    if *must_show && is_tight && !may_be_empty && !shows_data(&rows) {
                        failures.push(format!(
                            "{what}: no data ({} rows, none with a value other than null or 0)\n{q}",
                            rows.rows.len()
                        ));
                    }
                }
            }
        }
    }
    ran
}

/// A time-series result Grafana can draw: a `time` column, ascending (its
/// long-to-wide conversion needs rows sorted by time).
fn check_series(rows: &Rows) -> Result<(), String> {
    if rows.rows.is_empty() {
        return Ok(());
    }
    let Some(i) = rows.columns.iter().position(|c| c == "time") else {
        return Err(format!(
            "time-series format but no column named time (columns {:?})",
            rows.columns
        ));
    };
    let times: Vec<&str> = rows
        .rows
        .iter()
        .map(|r| r[i].as_deref().unwrap_or(""))
        .collect();
    let ordered = match times
        .iter()
        .map(|t| t.parse::<f64>())
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(nums) => nums.windows(2).all(|w| w[0] <= w[1]),
        // Timestamps in one session's time zone: text order is time order.
        Err(_) => times.windows(2).all(|w| w[0] <= w[1]),
    };
    if ordered {
        Ok(())
    } else {
        Err("time-series rows are not sorted by time".into())
    }
}

/// At least one row with a value (outside `time`) that is neither null nor zero.
fn shows_data(rows: &Rows) -> bool {
    rows.rows.iter().any(|r| {
        r.iter().enumerate().any(|(i, v)| {
            rows.columns.get(i).is_none_or(|c| c != "time")
                && v.as_deref().is_some_and(|v| v.parse::<f64>() != Ok(0.0))
        })
    })
}

// Grafana's expansion -------------------------------------------------------

/// A query as Grafana runs it: the browser replaces template variables and
/// the global `$__interval`-style variables, then the PostgreSQL data
/// source replaces its macros (`$__timeFilter(col)` ...).
fn expand(
    sql: &str,
    vars: &Values,
    range: &TimeRange,
    max_data_points: i64,
    min_interval: Option<&str>,
) -> Result<String, String> {
    let interval_ms = interval_ms(range, max_data_points, min_interval)?;
    let sql = replace_variables(sql, vars, range, interval_ms)?;
    replace_macros(&sql, range)
}

/// `$__interval`: the range over the data points, rounded as Grafana rounds
/// it, and at least the panel's minimum interval.
fn interval_ms(range: &TimeRange, max_data_points: i64, min: Option<&str>) -> Result<i64, String> {
    let raw = (range.to - range.from) * 1000 / max_data_points;
    const STEPS: [(i64, i64); 24] = [
        (15, 10),
        (35, 20),
        (75, 50),
        (150, 100),
        (350, 200),
        (750, 500),
        (1_500, 1_000),
        (3_500, 2_000),
        (7_500, 5_000),
        (12_500, 10_000),
        (17_500, 15_000),
        (25_000, 20_000),
        (45_000, 30_000),
        (90_000, 60_000),
        (210_000, 120_000),
        (450_000, 300_000),
        (750_000, 600_000),
        (1_050_000, 900_000),
        (1_500_000, 1_200_000),
        (2_700_000, 1_800_000),
        (5_400_000, 3_600_000),
        (9_000_000, 7_200_000),
        (16_200_000, 10_800_000),
        (24_300_000, 21_600_000),
    ];
    let rounded = STEPS
        .iter()
        .find(|(upto, _)| raw <= *upto)
        .map_or(86_400_000, |(_, v)| *v);
    let min = match min {
        Some(m) if !m.is_empty() => parse_interval(m)?,
        _ => 0,
    };
    Ok(rounded.max(min))
}

/// Grafana's interval syntax: `500ms`, `30s`, `1m`, `2h`, `1d`, `1w`, `1y`.
fn parse_interval(s: &str) -> Result<i64, String> {
    let s = s.trim().trim_matches('\'').trim_start_matches('>');
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: i64 = s[..digits]
        .parse()
        .map_err(|_| format!("bad interval {s:?}"))?;
    let unit = match &s[digits..] {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        "y" => 365 * 86_400_000,
        u => return Err(format!("bad interval unit {u:?} in {s:?}")),
    };
    Ok(n * unit)
}

/// How Grafana writes an interval (gtime.FormatInterval): `30s`, `1m`, `2h`, `1d`.
fn format_interval(ms: i64) -> String {
    for (unit, size) in [
        ("y", 365 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The browser's part: `$var`, `${var}` and `[[var]]` (dashboard variables,
/// already formatted for SQL) and the global `$__interval`, `$__interval_ms`,
/// `$__from`, `$__to`, `$__range_s`. Other `$__name`s are the data source's
/// macros and stay; an unknown `$name` is an error (Grafana would leave it
/// in the SQL).
fn replace_variables(
    sql: &str,
    vars: &Values,
    range: &TimeRange,
    interval_ms: i64,
) -> Result<String, String> {
    let global = |name: &str| -> Option<String> {
        Some(match name {
            "__interval" => format_interval(interval_ms),
            "__interval_ms" => interval_ms.to_string(),
            "__from" => (range.from * 1000).to_string(),
            "__to" => (range.to * 1000).to_string(),
            "__range_s" => (range.to - range.from).to_string(),
            "__range_ms" => ((range.to - range.from) * 1000).to_string(),
            _ => return None,
        })
    };
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find(['$', '[']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (name, len) = if let Some(inner) = tail.strip_prefix("${") {
            let Some(end) = inner.find('}') else {
                return Err(format!("unclosed ${{ in {tail:.40}"));
            };
            if inner[..end].contains(':') {
                return Err(format!(
                    "variable formats are not supported by this test: ${{{}}}",
                    &inner[..end]
                ));
            }
            (&inner[..end], end + 3)
        } else if let Some(inner) = tail.strip_prefix("[[") {
            match inner.find("]]") {
                Some(end) if inner[..end].chars().all(word) && end > 0 => (&inner[..end], end + 4),
                _ => {
                    out.push('[');
                    rest = &tail[1..];
                    continue;
                }
            }
        } else if let Some(inner) = tail.strip_prefix('$') {
            let end = inner.find(|c: char| !word(c)).unwrap_or(inner.len());
            (&inner[..end], end + 1)
        } else {
            out.push('[');
            rest = &tail[1..];
            continue;
        };
        if name.is_empty() {
            out.push_str(&tail[..1]);
            rest = &tail[1..];
            continue;
        }
        if let Some(v) = vars.get(name) {
            out.push_str(v);
        } else if let Some(v) = global(name) {
            out.push_str(&v);
        } else if name.starts_with("__") {
            out.push_str(&tail[..len]);
        } else {
            return Err(format!("unknown template variable ${name}"));
        }
        rest = &tail[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The PostgreSQL data source's macros, as its macro engine expands them
/// (grafana pkg/tsdb/grafana-postgresql-datasource/macros.go): a match is
/// `$name(args)` with no `)` inside the arguments, which are split at commas.
fn replace_macros(sql: &str, range: &TimeRange) -> Result<String, String> {
    let (from, to) = (rfc3339(range.from), rfc3339(range.to));
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    while let Some(d) = sql[i..].find('$') {
        let start = i + d;
        out.push_str(&sql[i..start]);
        let name_end = sql[start + 1..]
            .find(|c: char| !ident(c))
            .map_or(sql.len(), |e| start + 1 + e);
        let args_end = if name_end > start + 1 && sql[name_end..].starts_with('(') {
            sql[name_end..].find(')').map(|e| name_end + e)
        } else {
            None
        };
        let Some(args_end) = args_end else {
            out.push('$');
            i = start + 1;
            continue;
        };
        let whole = &sql[start..=args_end];
        let mut name = &sql[start + 1..name_end];
        let args: Vec<&str> = sql[name_end + 1..args_end]
            .split(',')
            .map(str::trim)
            .collect();
        // `$__timeGroup(...)` directly followed by a comma (at its first
        // occurrence) is taken for the pre-5.3 form and gets `AS "time"`.
        if name == "__timeGroup" {
            let first = sql.find(whole).unwrap() + whole.len();
            if sql[first..].starts_with(',') {
                name = "__timeGroupAlias";
            }
        }
        let column = || -> Result<&str, String> {
            match args.first() {
                Some(c) if !c.is_empty() => Ok(c),
                _ => Err(format!("missing time column argument for macro {name}")),
            }
        };
        let group = || -> Result<String, String> {
            if args.len() < 2 {
                return Err(format!(
                    "macro {name} needs time column and interval and optional fill value"
                ));
            }
            let secs = parse_interval(args[1])? as f64 / 1000.0;
            Ok(format!(
                "floor(extract(epoch from {})/{secs})*{secs}",
                args[0]
            ))
        };
        let expanded = match name {
            "__time" => format!("{} AS \"time\"", column()?),
            "__timeEpoch" => format!("extract(epoch from {}) as \"time\"", column()?),
            "__timeFilter" => format!("{} BETWEEN '{from}' AND '{to}'", column()?),
            "__timeFrom" => format!("'{from}'"),
            "__timeTo" => format!("'{to}'"),
            "__timeGroup" => group()?,
            "__timeGroupAlias" => format!("{} AS \"time\"", group()?),
            "__unixEpochFilter" => {
                let c = column()?;
                format!("{c} >= {} AND {c} <= {}", range.from, range.to)
            }
            "__unixEpochFrom" => range.from.to_string(),
            "__unixEpochTo" => range.to.to_string(),
            _ => return Err(format!("unknown macro \"{name}\"")),
        };
        out.push_str(&expanded);
        i = args_end + 1;
    }
    out.push_str(&sql[i..]);
    Ok(out)
}

/// Unix seconds as Go's RFC 3339 in UTC (`2026-11-23T00:00:00Z`).
fn rfc3339(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[test]
fn macros_expand_as_grafana_expands_them() {
    let range = TimeRange::new(TRACE_START, TRACE_START + 3600);
    assert_eq!(rfc3339(TRACE_START), "2026-11-23T00:00:00Z");
    assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    let mut vars = Values::new();
    vars.insert("tier".into(), "'__all'".into());
    vars.insert("user".into(), "'acct_1','acct_2'".into());
    let q = expand(
        "SELECT $__timeGroupAlias(minute, $__interval), $__timeGroup(ts, '5m') AS b, \
         sum(x) / $__interval_ms FROM t WHERE $__timeFilter(minute) AND u IN ($user) \
         AND ('__all' IN (${tier}) OR k = [[tier]]) AND ts > $__timeFrom() AND ts < $__timeTo()",
        &vars,
        &range,
        1000,
        Some("1m"),
    )
    .unwrap();
    assert_eq!(
        q,
        "SELECT floor(extract(epoch from minute)/60)*60 AS \"time\", floor(extract(epoch from ts)/300)*300 AS b, \
         sum(x) / 60000 FROM t WHERE minute BETWEEN '2026-11-23T00:00:00Z' AND '2026-11-23T01:00:00Z' \
         AND u IN ('acct_1','acct_2') AND ('__all' IN ('__all') OR k = '__all') \
         AND ts > '2026-11-23T00:00:00Z' AND ts < '2026-11-23T01:00:00Z'"
    );
    // The pre-5.3 form: $__timeGroup followed by a comma gets its alias.
    assert_eq!(
        replace_macros("SELECT $__timeGroup(t, 1h), v", &range).unwrap(),
        "SELECT floor(extract(epoch from t)/3600)*3600 AS \"time\", v"
    );
    // Without a minimum, an hour over 1000 points is 3.6 s, rounded to 5 s.
    assert_eq!(interval_ms(&range, 1000, None).unwrap(), 5_000);
    assert!(expand("SELECT $nope", &vars, &range, 1000, None).is_err());
    assert!(expand("SELECT $__nope(x)", &vars, &range, 1000, None).is_err());
    // Dollar signs that are neither stay.
    assert_eq!(
        expand("SELECT '$', 1", &vars, &range, 1000, None).unwrap(),
        "SELECT '$', 1"
    );
}
