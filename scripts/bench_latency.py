#!/usr/bin/env python3
"""End-to-end latency under load: from a record's produce time to the
action it leads to, in Postgres and in the hands of a gateway long-polling
the feed. Two modes, each run through its shell wrapper, which builds
keywatch and installs what is missing:

* `bash scripts/bench-latency [SECONDS] [RATE]` (mode `budget`, stage one):
  benign canonical records in real time at RATE records/s (default 50,000)
  from 100,000 accounts over 6 partitions, and every second a new "burner"
  account on the free tier ($1 a day) sending two records of $0.60: the
  second crosses 100% of its budget, which is one `budget_threshold` alert
  and one block in the feed. Measured per burner, from the produce time of
  its crossing record to (a) its alert row being visible in Postgres (a
  persistent psql connection polls every 20 ms) and (b) its block arriving
  at a gateway long-polling `/v1/revocations?wait=30`.
* `bash scripts/bench-second-stage [SECONDS] [RATE]` (mode `second-stage`):
  benign records at RATE (default 2,000) from 3,000 accounts, and every 3 s
  a credential-stuffing burst from a new address (30 guessed keys, each
  refused with 401, within about a second): one `credential_stuffing`
  alert and one address block each, judged by the second stage, which
  waits until every partition has passed a record's time by
  `engine.subjects.lateness_secs` (KW_BENCH_LATENESS, keywatch's default
  5 s) so the service and an offline replay decide alike; the delay is
  measured to the gateway from the alert's `ts` (the crossing record's
  event time, which is its produce time here).

Both start tansu (in-memory) on a free loopback port with `gw` (6
partitions), `gw-dlq` and the second stage's topic (6 partitions), and
`keywatch run` (both stages, its feed on a free port with a gateway token)
on a fresh database; everything shares the machine's cores. Knobs:
KW_BENCH_CHECKPOINT_SECS, KW_BENCH_CHECKPOINT_MBPS and
KW_BENCH_ROLLUP_FLUSH_SECS set `pipeline.checkpoint_interval_secs`,
`checkpoint_write_mb_per_sec` and `rollup_flush_secs`.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kafka as bk  # noqa: E402  (shared process, database and tansu helpers)

from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

TOKEN = "kwf_latency-bench"
# engine.subjects.lateness_secs for the run (KW_BENCH_LATENESS; keywatch's default 5).
LATENESS = int(os.environ.get("KW_BENCH_LATENESS", "5"))
SUBJECTS = "keywatch.by-subject"
# pipeline.checkpoint_interval_secs for the run (KW_BENCH_CHECKPOINT_SECS; keywatch's default 60).
CHECKPOINT_SECS = int(os.environ.get("KW_BENCH_CHECKPOINT_SECS", "60"))
# pipeline.checkpoint_write_mb_per_sec (KW_BENCH_CHECKPOINT_MBPS; unset: keywatch's default).
CHECKPOINT_MBPS = os.environ.get("KW_BENCH_CHECKPOINT_MBPS", "")
ROLLUP_FLUSH = bk.ROLLUP_FLUSH  # KW_BENCH_ROLLUP_FLUSH_SECS


def iso(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{int(ms) % 1000:03d}Z"


def parse_iso(s):
    base, frac = s.rstrip("Z").split(".")
    t = time.strptime(base, "%Y-%m-%dT%H:%M:%S")
    import calendar
    return calendar.timegm(t) * 1000 + int(frac[:3].ljust(3, "0"))


def record(now_ms, rid, user, key, ip, asn, status=200, pt=300, ct=150):
    return json.dumps({
        "ts": iso(now_ms), "request_id": rid, "user_id": user, "key_id": key, "tier": "pro",
        "ip": ip, "asn": asn, "user_agent": "OpenAI/Python 1.58.1", "endpoint": "/v1/chat/completions",
        "model": "gpt-4o-mini", "status": status, "prompt_tokens": pt if status == 200 else 0,
        "completion_tokens": ct if status == 200 else 0, "latency_ms": 800,
    }).encode()


# A benign record, formatted without json.dumps (RATE may be 50,000 a second
# from one Python thread): time, request number, account, key, address.
BENIGN = ('{"ts":"%s","request_id":"r%d","user_id":"%s","key_id":"%s","tier":"pro","ip":"%s",'
          '"asn":7922,"user_agent":"OpenAI/Python 1.58.1","endpoint":"/v1/chat/completions",'
          '"model":"gpt-4o-mini","status":200,"prompt_tokens":300,"completion_tokens":150,'
          '"latency_ms":800}')


def start_stack(tmp, tag, extra=""):
    """tansu, the topics, a fresh database and `keywatch run` with its feed
    (`extra`: more config lines); returns (broker address, feed port,
    database url)."""
    tansu, addr, _ = bk.start_tansu(tmp)
    bk.TANSU = tansu
    admin = AdminClient({"bootstrap.servers": addr})
    for name, fut in admin.create_topics(
        [NewTopic("gw", 6, 1), NewTopic("gw-dlq", 1, 1), NewTopic(SUBJECTS, 6, 1)],
        operation_timeout=30, request_timeout=30,
    ).items():
        fut.result(timeout=60)
    db = f"kw_bench_{bk.PID}_{tag}"
    bk.psql(f"CREATE DATABASE {db}")
    bk.CLEAN.dbs.append(db)
    port = bk.free_port()
    import hashlib
    cfg = os.path.join(tmp, "keywatch.toml")
    with open(cfg, "w") as f:
        f.write(f"""[kafka]
brokers = "{addr}"
topics = ["gw"]
group_id = "bench-{tag}-{bk.PID}"
dead_letter_topic = "gw-dlq"

[kafka.subjects]
topic = "{SUBJECTS}"

[pipeline]
batch_max_ms = 200
checkpoint_interval_secs = {CHECKPOINT_SECS}
{f"checkpoint_write_mb_per_sec = {CHECKPOINT_MBPS}" if CHECKPOINT_MBPS else ""}
{f"rollup_flush_secs = {ROLLUP_FLUSH}" if ROLLUP_FLUSH else ""}
parquet_dir = "{os.path.join(tmp, 'lake')}"

[postgres]
url = "{bk.db_url(db)}"

[privacy]
hash_key = "bench"

[engine.subjects]
lateness_secs = {LATENESS}

[feed]
listen = "127.0.0.1:{port}"
requests_per_minute = 100000

[[feed.clients]]
name = "gateway"
token_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
{extra}""")
    logf = os.path.join(tmp, "keywatch.log")
    kw = bk.CLEAN.spawn([bk.BIN, "run", "--progress-secs", "0", "--config", cfg],
                        stdout=subprocess.DEVNULL, stderr=open(logf, "w"))
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
            break
        except OSError:
            if kw.poll() is not None or time.monotonic() > deadline:
                raise bk.BenchError(f"keywatch did not start:\n{bk.tail(logf)}")
            time.sleep(0.2)
    return addr, port, bk.db_url(db)


def watch_feed(port, pick, seen, done):
    """Long-polls the feed as a gateway does; for each action `pick` names
    (a key, or None), records when it arrived (ms) with the action."""
    def poll():
        after = 0
        while not done.is_set():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/revocations?after={after}&wait=30",
                headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                page = json.loads(urllib.request.urlopen(req, timeout=40).read())
            except OSError:
                time.sleep(0.2)
                continue
            now = time.time() * 1000
            for a in page["actions"]:
                k = pick(a)
                if k is not None:
                    seen.setdefault(k, (now, a))
            after = page["next_after"]
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    return t


def run_traffic(addr, seconds, rate, accounts, every, attack, on_tick=None):
    """Produces benign records in real time at `rate` a second (paced every
    10 ms, event time = produce time to the tick) and calls `attack(producer,
    n)` every `every` seconds; returns the benign count."""
    producer = Producer({"bootstrap.servers": addr, "linger.ms": 5, "acks": "all",
                         "queue.buffering.max.messages": 1000000, "batch.size": 1000000})
    rng = random.Random(7)
    users = [(f"acct_{i:05d}", f"key_{i:05d}", f"73.{i % 200}.{(i // 200) % 250}.{1 + i % 250}")
             for i in range(accounts)]
    start = time.time()
    n, b, next_attack, log_every = 0, 0, start + 10, start + 10
    while time.time() - start < seconds:
        now = time.time()
        due = int((now - start) * rate) - n
        if due > 0:
            ms = int(now * 1000)
            ts = iso(ms)
            for _ in range(due):
                u, k, ip = users[rng.randrange(accounts)]
                try:
                    producer.produce("gw", (BENIGN % (ts, n, u, k, ip)).encode(), key=u.encode(),
                                     timestamp=ms)
                except BufferError:
                    producer.poll(0.05)
                    continue
                n += 1
        if now >= next_attack:
            attack(producer, b)
            b += 1
            next_attack = now + every
        producer.poll(0)
        if now >= log_every:
            bk.log(f"{n:,} records ({n / (now - start):,.0f}/s), {b} attacks" + (on_tick() if on_tick else ""))
            log_every = now + 10
        time.sleep(0.005)
    producer.flush(60)
    return n, b


def pct(delays, p):
    return delays[min(len(delays) - 1, int(round((len(delays) - 1) * p)))]


def summary(delays):
    if not delays:
        return "none seen"
    delays = sorted(delays)
    return (f"p50 {pct(delays, 0.5):,.0f} ms, p99 {pct(delays, 0.99):,.0f} ms, "
            f"max {delays[-1]:,.0f} ms ({len(delays)} seen)")


def second_stage(addr, port, db_url, seconds, rate):
    seen, done = {}, threading.Event()
    watch_feed(port, lambda a: a.get("ip") or None, seen, done)
    bursts = []

    def burst(producer, b):
        # A stuffing burst: 30 guessed keys from one new hosting address.
        ip = f"45.79.{b // 250}.{1 + b % 250}"
        for g in range(30):
            ms = int(time.time() * 1000)
            guess = f"kh_guess{b}_{g}"
            producer.produce("gw", record(ms, f"s{b}_{g}", guess, guess, ip, 63949, status=401),
                             key=guess.encode(), timestamp=ms)
            time.sleep(0.02)
        bursts.append(ip)

    n, _ = run_traffic(addr, seconds, rate, 3000, 3, burst,
                       lambda: f", {len(seen)} address actions seen")
    # Let the last bursts through: sources go idle, then everything is judged.
    end = time.monotonic() + 30
    while time.monotonic() < end and len(seen) < len(bursts):
        time.sleep(0.5)
    done.set()
    delays = [arrived - parse_iso(a["issued_at"]) for arrived, a in seen.values()]
    print()
    print(f"keywatch second-stage latency: bash scripts/bench-second-stage {seconds} {rate}")
    print(f"traffic: {n:,} benign records at {rate}/s from 3,000 accounts over 6 partitions, in real time, "
          f"and {len(bursts)} credential-stuffing bursts (30 guessed keys, 401 each, from one new address)")
    print(f"address blocks seen by a long-polling gateway: {len(seen)} of {len(bursts)} bursts "
          f"(the last ones, produced within the lateness of the end, may be missing)")
    print(f"record produced -> its stage-two block in the gateway's hands: {summary(delays)} "
          f"(engine.subjects.lateness_secs = {LATENESS}: the wait that puts the second stage in event-time order)")


# The benign accounts are the gateway's long-standing customers, but new to
# keywatch, which starts cold here: at its default prior (2 requests a
# minute) it would take every one of them for a flood in its first minutes
# and the run would measure 100,000 throttles. Expecting a new account at
# its tier's rate (60 a minute for pro) keeps the load benign.
BUDGET_CONFIG = """
[engine.request_spike]
prior_fraction = 1.0
"""
BUDGET_ACCOUNTS = 100_000


def budget(addr, port, db_url, seconds, rate):
    seen, done = {}, threading.Event()
    watch_feed(port, lambda a: a["user_id"] if a.get("user_id", "").startswith("burn_") else None,
               seen, done)
    crossed = {}  # burner -> produce time (ms) of its crossing record
    in_db = {}    # burner -> when its 100% alert was first visible in Postgres (ms)
    poller = bk.Poller(db_url)

    def watch_db():
        while not done.is_set():
            try:
                rows = poller.query(
                    "SELECT user_id FROM alerts WHERE kind = 'budget_threshold' AND user_id LIKE 'burn\\_%' "
                    "AND alert->'budget'->>'percent' = '100' AND created_at > now() - interval '60 seconds'")
            except bk.BenchError:
                return  # closed at the end of the run
            now = time.time() * 1000
            for u in rows:
                in_db.setdefault(u, now)
            time.sleep(0.02)

    db_watcher = threading.Thread(target=watch_db, daemon=True)
    db_watcher.start()

    def burner(producer, b):
        u = f"burn_{b:05d}"
        for i in range(2):
            ms = int(time.time() * 1000)
            body = json.dumps({
                "ts": iso(ms), "request_id": f"{u}_{i}", "user_id": u, "key_id": f"kb_{b:05d}",
                "tier": "free", "ip": "198.51.100.7", "asn": 7922, "endpoint": "/v1/chat/completions",
                "model": "gpt-4o-mini", "status": 200, "prompt_tokens": 3000, "completion_tokens": 900,
                "cost_usd": 0.6, "latency_ms": 900,
            }).encode()
            producer.produce("gw", body, key=u.encode(), timestamp=ms)
            if i == 1:
                crossed[u] = ms
            time.sleep(0.05)

    n, _ = run_traffic(addr, seconds, rate, BUDGET_ACCOUNTS, 1, burner,
                       lambda: f", {len(in_db)} budget alerts in Postgres, {len(seen)} blocks at the gateway")
    end = time.monotonic() + 20
    while time.monotonic() < end and min(len(seen), len(in_db)) < len(crossed):
        time.sleep(0.5)
    done.set()
    db_watcher.join(5)
    to_db = [in_db[u] - ms for u, ms in crossed.items() if u in in_db]
    to_feed = [seen[u][0] - ms for u, ms in crossed.items() if u in seen]
    print()
    print(f"keywatch end-to-end latency: bash scripts/bench-latency {seconds} {rate}")
    print(f"pipeline.batch_max_ms = 200, pipeline.checkpoint_interval_secs = {CHECKPOINT_SECS}, "
          f"pipeline.checkpoint_write_mb_per_sec = {CHECKPOINT_MBPS or 'default'}, "
          f"pipeline.rollup_flush_secs = {ROLLUP_FLUSH or 'default'}")
    print(f"traffic: {n:,} benign records at {rate:,}/s asked ({n / seconds:,.0f}/s produced) from "
          f"{BUDGET_ACCOUNTS:,} accounts over 6 partitions, in real time, and {len(crossed)} burners "
          f"(free tier, two $0.60 records); request_spike prior_fraction = 1.0 (see BUDGET_CONFIG)")
    print("alerts stored, by kind: " + ", ".join(poller.query(
        "SELECT kind || ' ' || count(*) FROM alerts GROUP BY kind ORDER BY kind")))
    print(f"record produced -> its 100% budget alert visible in Postgres: {summary(to_db)}")
    print(f"record produced -> its block in a long-polling gateway's hands: {summary(to_feed)}")
    # In produce order: a delay that grows over the run is a consumer falling behind.
    print("per burner, in produce order (ms to Postgres / to the gateway): " + ", ".join(
        f"{in_db[u] - ms:.0f}/{seen[u][0] - ms:.0f}" if u in in_db and u in seen else "-"
        for u, ms in sorted(crossed.items(), key=lambda kv: kv[1])))


def main():
    mode = sys.argv[1]
    seconds = int(sys.argv[2])
    rate = int(sys.argv[3])
    import tempfile
    tmp = tempfile.mkdtemp(prefix=f"kw-bench-{bk.PID}-")
    bk.CLEAN.tmp = tmp
    bk.remove_stale()
    addr, port, db_url = start_stack(tmp, "lat" if mode == "budget" else "2nd",
                                     BUDGET_CONFIG if mode == "budget" else "")
    {"budget": budget, "second-stage": second_stage}[mode](addr, port, db_url, seconds, rate)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_signal)
    code = 0
    try:
        main()
    except bk.BenchError as e:
        bk.log(f"FAILED: {e}")
        code = 1
    except KeyboardInterrupt:
        bk.log("interrupted; cleaning up")
        code = 130
    finally:
        bk.CLEAN.run()
    sys.exit(code)
