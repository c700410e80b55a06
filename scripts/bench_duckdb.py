#!/usr/bin/env python3
"""keywatch replay next to DuckDB over the same simulated NDJSON file.

Run by scripts/bench-duckdb (which builds keywatch, writes the file and
installs duckdb when missing); usable alone:

    python3 scripts/bench_duckdb.py FILE [--runs N] [--bin target/release/keywatch]

Times, each the median of --runs runs, in this one process:
  * `keywatch replay --json-summary FILE` (decode + every detector, one
    core): wall time of the process, and the summary's records_per_second;
  * DuckDB (single-threaded, `SET threads=1`, and its default thread count):
    load the file with read_ndjson into an in-memory table, then per-user-
    minute rollups (requests, prompt and completion tokens, cost) and budget
    crossings (the record at which a user's running daily spend first
    reaches 50/80/100% of its tier's daily budget: free $1, pro $50,
    enterprise $500), with the cost defined two ways:
      A  cost = coalesce(cost_usd, 0), summed as DOUBLE (no price table);
      B  keywatch's rule: micro-dollars per record, round(cost_usd * 1e6) when
         cost_usd is present, else the model's list price (keywatch's built-in
         table, the models the simulator emits) for records that count the
         response (not phase "request"), summed as integers, the bar being
         ceil(limit * percent / 100) micro-dollars.
Both drop repeated (request_id, phase) records, as keywatch does.

Then compares the crossings with keywatch's budget_threshold alerts (the
alerts keywatch replay writes on stdout), per percent, by (user, day,
percent) and by the crossing record's time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

try:
    import duckdb
except ImportError:
    sys.exit("bench_duckdb: duckdb is missing: python3 -m pip install duckdb (scripts/bench-duckdb does)")

PERCENTS = (50, 80, 100)
# Daily budgets of keywatch's built-in tiers (keywatch.example.toml); a
# missing or unknown tier is the default tier, free.
BUDGET_USD = {"free": 1.0, "pro": 50.0, "enterprise": 500.0}
# keywatch's built-in prices (detectors/src/price.rs), USD per 1M tokens,
# for the seven models `keywatch simulate` writes.
PRICES = {
    "gpt-4o": (2.50, 10.0),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-5-haiku": (0.80, 4.0),
    "gemini-2.0-flash": (0.10, 0.40),
}

COLUMNS = (
    "{ts: 'TIMESTAMP', request_id: 'VARCHAR', phase: 'VARCHAR', user_id: 'VARCHAR', "
    "tier: 'VARCHAR', model: 'VARCHAR', prompt_tokens: 'BIGINT', completion_tokens: 'BIGINT', "
    "cost_usd: 'DOUBLE'}"
)


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


def load_sql(path):
    # One row per (request_id, phase): a redelivered line is byte for byte
    # the copy of one already read, so which copy stays does not matter.
    return f"""
CREATE TABLE ev AS
SELECT ts, request_id, coalesce(phase, 'exchange') AS phase, user_id,
       coalesce(tier, 'free') AS tier, model,
       coalesce(prompt_tokens, 0) AS prompt_tokens,
       coalesce(completion_tokens, 0) AS completion_tokens, cost_usd
FROM read_ndjson({sql_str(path)}, columns = {COLUMNS}, format = 'newline_delimited')
QUALIFY row_number() OVER (PARTITION BY request_id, coalesce(phase, 'exchange')) = 1
"""


def prices_sql():
    rows = ", ".join(f"({sql_str(m)}, {i}::DOUBLE, {o}::DOUBLE)" for m, (i, o) in PRICES.items())
    return f"CREATE TABLE prices(model VARCHAR, input_per_mtok DOUBLE, output_per_mtok DOUBLE); INSERT INTO prices VALUES {rows}"


def budgets_sql():
    rows = ", ".join(f"({sql_str(t)}, {b}::DOUBLE)" for t, b in BUDGET_USD.items())
    return f"CREATE TABLE budgets(tier VARCHAR, daily_usd DOUBLE); INSERT INTO budgets VALUES {rows}"


# Cost of each record, per variant, as a SQL expression over ev e and prices p.
COST = {
    "A": "coalesce(e.cost_usd, 0)",
    "B": """CASE WHEN e.cost_usd IS NOT NULL THEN round(e.cost_usd * 1e6)::BIGINT
                 WHEN e.phase = 'request' THEN 0
                 ELSE coalesce(round(e.prompt_tokens::DOUBLE * p.input_per_mtok
                                     + e.completion_tokens::DOUBLE * p.output_per_mtok)::BIGINT, 0) END""",
}
# B prices records without cost_usd: it needs the price table.
JOIN = {"A": "", "B": "LEFT JOIN prices p USING (model)"}
# The daily budget of a record's tier, per variant (B: micro-dollars).
BUDGET = {
    "A": "coalesce(b.daily_usd, 1.0)",
    "B": "round(coalesce(b.daily_usd, 1.0) * 1e6)::BIGINT",
}


def rollups_sql(v):
    return f"""
CREATE OR REPLACE TABLE rollups_{v} AS
SELECT e.user_id, time_bucket(INTERVAL 1 minute, e.ts) AS minute,
       count(*) FILTER (WHERE e.phase <> 'response') AS requests,
       sum(e.prompt_tokens) FILTER (WHERE e.phase <> 'response') AS prompt_tokens,
       sum(e.completion_tokens) FILTER (WHERE e.phase <> 'request') AS completion_tokens,
       sum({COST[v]}) AS cost
FROM ev e {JOIN[v]}
GROUP BY ALL
"""


def crossings_sql(v):
    bar = "c.budget * pct.percent / 100.0" if v == "A" else "(c.budget * pct.percent + 99) // 100"
    return f"""
CREATE OR REPLACE TABLE crossings_{v} AS
WITH spend AS (
    SELECT e.user_id, date_trunc('day', e.ts) AS day, e.ts, e.request_id, e.phase,
           {COST[v]} AS cost, {BUDGET[v]} AS budget
    FROM ev e {JOIN[v]} LEFT JOIN budgets b USING (tier)
), c AS (
    SELECT *, sum(cost) OVER (PARTITION BY user_id, day ORDER BY ts, request_id, phase
                              ROWS UNBOUNDED PRECEDING) AS cum
    FROM spend WHERE cost > 0
)
SELECT c.user_id, c.day, pct.percent, c.ts, c.request_id, c.cum AS spent, {bar} AS bar
FROM c, (VALUES {", ".join(f"({p})" for p in PERCENTS)}) pct(percent)
WHERE c.cum >= {bar} AND c.cum - c.cost < {bar}
"""


def duckdb_run(path, threads):
    """One timed run: a fresh in-memory database. Returns seconds per step and the connection."""
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    if threads:
        con.execute(f"SET threads = {threads}")
    con.execute(prices_sql())
    con.execute(budgets_sql())
    t = {}
    s = time.perf_counter()
    con.execute(load_sql(path))
    t["load"] = time.perf_counter() - s
    for v in ("A", "B"):
        s = time.perf_counter()
        con.execute(rollups_sql(v))
        t[f"rollups_{v}"] = time.perf_counter() - s
        s = time.perf_counter()
        con.execute(crossings_sql(v))
        t[f"crossings_{v}"] = time.perf_counter() - s
    t["threads"] = con.execute("SELECT current_setting('threads')").fetchone()[0]
    return t, con


def keywatch_run(binary, path, alerts_path):
    s = time.perf_counter()
    with open(alerts_path, "wb") as out:
        p = subprocess.run([binary, "replay", "--json-summary", path], stdout=out, stderr=subprocess.PIPE, check=True)
    wall = time.perf_counter() - s
    summary = json.loads(p.stderr.decode().strip().splitlines()[-1])
    return wall, summary


def keywatch_crossings(alerts_path):
    got = {}
    with open(alerts_path) as f:
        for line in f:
            a = json.loads(line)
            if a["kind"] != "budget_threshold" or a["budget"]["period"] != "day":
                continue
            b = a["budget"]
            got[(a["user_id"], b["period_start"][:10], b["percent"])] = a["ts"][:23]
    return got


def duckdb_crossings(con, v):
    rows = con.execute(
        f"SELECT user_id, strftime(day, '%Y-%m-%d'), percent, strftime(ts, '%Y-%m-%dT%H:%M:%S.%g') FROM crossings_{v}"
    ).fetchall()
    return {(u, d, p): ts for u, d, p, ts in rows}


def compare(name, kw, dd):
    lines = []
    kc = Counter(k[2] for k in kw)
    dc = Counter(k[2] for k in dd)
    both = kw.keys() & dd.keys()
    same_ts = sum(1 for k in both if kw[k] == dd[k])
    per = ", ".join(f"{p}%: keywatch {kc[p]:,} / duckdb {dc[p]:,}" for p in PERCENTS)
    lines.append(f"  {name}: {per}")
    lines.append(
        f"    (user, day, percent) in both: {len(both):,}; only keywatch: {len(kw.keys() - dd.keys()):,}; "
        f"only duckdb: {len(dd.keys() - kw.keys()):,}; same crossing time in both: {same_ts:,} of {len(both):,}"
    )
    for k in sorted(kw.keys() - dd.keys())[:3]:
        lines.append(f"    e.g. only keywatch: {k} at {kw[k]}")
    for k in sorted(dd.keys() - kw.keys())[:3]:
        lines.append(f"    e.g. only duckdb:   {k} at {dd[k]}")
    return lines


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bin", default="target/release/keywatch")
    args = ap.parse_args()
    path = os.path.abspath(args.file)
    size = os.path.getsize(path)

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        alerts = os.path.join(tmp, "alerts.ndjson")
        kw_wall, kw_rate, summary = [], [], None
        for _ in range(args.runs):
            wall, summary = keywatch_run(args.bin, path, alerts)
            kw_wall.append(wall)
            kw_rate.append(summary["records_per_second"])
        records = summary["records"]
        kw = keywatch_crossings(alerts)

        results = {}
        last_con = None
        for threads in (1, 0):
            runs = []
            for _ in range(args.runs):
                if last_con is not None:
                    last_con.close()
                t, last_con = duckdb_run(path, threads)
                runs.append(t)
            results[threads] = runs

        con = last_con
        n_ev, n_models = con.execute("SELECT count(*), count(DISTINCT model) FROM ev").fetchone()
        unknown = [m for (m,) in con.execute("SELECT DISTINCT model FROM ev").fetchall() if m not in PRICES]
        without_cost = con.execute(
            "SELECT count(*) FILTER (WHERE cost_usd IS NULL AND phase <> 'request'), "
            "count(*) FILTER (WHERE phase <> 'request') FROM ev"
        ).fetchone()
        days = con.execute("SELECT min(ts), max(ts) FROM ev").fetchone()
        roll = {}
        for v in ("A", "B"):
            roll[v] = con.execute(
                f"SELECT count(*), sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost) FROM rollups_{v}"
            ).fetchone()
        dd = {v: duckdb_crossings(con, v) for v in ("A", "B")}
        con.close()

    stats = summary.get("engine") or {}
    out.append(f"file:      {args.file} ({records:,} records, {size / 1e6:.1f} MB, mean {size // max(records, 1)} bytes)")
    out.append(
        f"           {n_ev:,} distinct (request_id, phase) records, {records - n_ev:,} repeats; "
        f"{days[0]} .. {days[1]} UTC; {n_models} models"
        + (f" (not in the price table: {unknown})" if unknown else "")
    )
    out.append(
        f"           {without_cost[0]:,} of {without_cost[1]:,} records that count a response have no cost_usd "
        f"({without_cost[0] / max(without_cost[1], 1):.0%}): keywatch prices them from its table"
    )
    out.append(f"runs:      {args.runs} of each, medians; duckdb {duckdb.__version__}, a fresh in-memory database each run")
    out.append("")
    out.append(
        f"keywatch replay (decode + every detector, one core):  {med(kw_wall):.2f} s wall, "
        f"{records / med(kw_wall):,.0f} records/s wall; summary: {med(kw_rate):,.0f} records/s "
        f"[{', '.join(f'{r:,.0f}' for r in kw_rate)}]"
    )
    out.append(
        f"  engine: {stats.get('duplicates', 0):,} duplicates, {stats.get('late', 0):,} late, "
        f"{stats.get('unpriced', 0):,} unpriced; alerts {summary.get('alerts', 0):,}"
    )
    for threads, runs in results.items():
        label = "threads=1" if threads == 1 else f"default threads ({runs[0]['threads']})"
        load = med([r["load"] for r in runs])
        for v in ("A", "B"):
            tot = [r["load"] + r[f"rollups_{v}"] + r[f"crossings_{v}"] for r in runs]
            out.append(
                f"duckdb {label}, cost {v}: {med(tot):.2f} s wall, {records / med(tot):,.0f} records/s "
                f"(load {load:.2f} s + rollups {med([r[f'rollups_{v}'] for r in runs]):.2f} s "
                f"+ crossings {med([r[f'crossings_{v}'] for r in runs]):.2f} s) "
                f"[{', '.join(f'{x:.2f}' for x in tot)}]"
            )
    out.append("")
    out.append("rollups (duckdb, per user and minute):")
    for v in ("A", "B"):
        rows, req, pt, ct, cost = roll[v]
        cost_s = f"${cost:,.2f}" if v == "A" else f"${cost / 1e6:,.2f} ({cost:,} micro-dollars)"
        out.append(
            f"  cost {v}: {rows:,} rows, {req:,} requests, {pt:,} prompt tokens, {ct:,} completion tokens, {cost_s}"
        )
    out.append("")
    out.append("daily budget crossings, keywatch budget_threshold alerts vs duckdb:")
    out.extend(compare("cost A (coalesce(cost_usd, 0))", kw, dd["A"]))
    out.extend(compare("cost B (keywatch's pricing, micro-dollars)", kw, dd["B"]))
    print("\n".join(out))


if __name__ == "__main__":
    main()
