#!/usr/bin/env python3
"""Second-stage latency: from a record's produce time to its stage-two
action in a long-polling gateway's hands.

Run through `bash scripts/bench-second-stage [SECONDS] [RATE]`, which builds
keywatch and installs what is missing. This script:

1. starts tansu (in-memory) on a free loopback port with `gw` (6
   partitions), `gw-dlq` and the second stage's topic (6 partitions);
2. starts `keywatch run` (both stages, its feed on a free port with a
   gateway token) on a fresh database;
3. produces benign canonical records in real time (event time = now) at
   RATE records/s from 3,000 accounts, and every 3 s a credential-stuffing
   burst from a new address (30 guessed keys, each refused with 401, within
   about a second): each burst is one `credential_stuffing` alert and one
   address block in the feed;
4. a gateway long-polls `/v1/revocations?wait=30`; for every address
   action it records when it arrived, and the delay is that minus the
   produce time of the burst's crossing record (the alert's `ts`, which is
   the record's event time, which is its produce time here);
5. prints p50/p99/max of the delays and how many bursts were seen.

The second stage waits until every partition has passed a record's time by
`engine.subjects.lateness_secs` (5 s by default) before it judges it, so
that the service and an offline replay decide alike; the delay is that
wait plus a batch on each side. Everything is on loopback.
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

TOKEN = "kwf_second-stage-latency-bench"
# engine.subjects.lateness_secs for the run (KW_BENCH_LATENESS; keywatch's default 5).
LATENESS = int(os.environ.get("KW_BENCH_LATENESS", "5"))
SUBJECTS = "keywatch.by-subject"


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


def main():
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    rate = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    import tempfile
    tmp = tempfile.mkdtemp(prefix=f"kw-bench-{bk.PID}-")
    bk.CLEAN.tmp = tmp
    bk.remove_stale()
    tansu, addr, _ = bk.start_tansu(tmp)
    bk.TANSU = tansu
    admin = AdminClient({"bootstrap.servers": addr})
    for name, fut in admin.create_topics(
        [NewTopic("gw", 6, 1), NewTopic("gw-dlq", 1, 1), NewTopic(SUBJECTS, 6, 1)],
        operation_timeout=30, request_timeout=30,
    ).items():
        fut.result(timeout=60)
    db = f"kw_bench_{bk.PID}_2nd"
    bk.psql(f"CREATE DATABASE {db}")
    bk.CLEAN.dbs.append(db)
    port = bk.free_port()
    import hashlib
    cfg = os.path.join(tmp, "keywatch.toml")
    with open(cfg, "w") as f:
        f.write(f"""[kafka]
brokers = "{addr}"
topics = ["gw"]
group_id = "bench-2nd-{bk.PID}"
dead_letter_topic = "gw-dlq"

[kafka.subjects]
topic = "{SUBJECTS}"

[pipeline]
batch_max_ms = 200
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
""")
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

    seen = {}  # ip -> (arrival ms, alert ts ms)
    done = threading.Event()

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
                if a.get("ip"):
                    seen.setdefault(a["ip"], (now, parse_iso(a["issued_at"])))
            after = page["next_after"]

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()

    producer = Producer({"bootstrap.servers": addr, "linger.ms": 5, "acks": "all"})
    rng = random.Random(7)
    users = [(f"acct_{i:05d}", f"key_{i:05d}", f"73.{i % 200}.{i // 200}.{1 + i % 250}") for i in range(3000)]
    bursts = []
    start = time.time()
    n, next_burst, b = 0, start + 10, 0
    log_every = start + 10
    while time.time() - start < seconds:
        now = time.time()
        # Benign records at `rate` per second, paced every 10 ms.
        due = int((now - start) * rate) - n
        for _ in range(max(0, due)):
            u, k, ip = users[rng.randrange(len(users))]
            ms = int(time.time() * 1000)
            producer.produce("gw", record(ms, f"r{n}", u, k, ip, 7922), key=u.encode(), timestamp=ms)
            n += 1
        if now >= next_burst:
            # A stuffing burst: 30 guessed keys from one new hosting address.
            ip = f"45.79.{b // 250}.{1 + b % 250}"
            for g in range(30):
                ms = int(time.time() * 1000)
                guess = f"kh_guess{b}_{g}"
                producer.produce("gw", record(ms, f"s{b}_{g}", guess, guess, ip, 63949, status=401),
                                 key=guess.encode(), timestamp=ms)
                time.sleep(0.02)
            bursts.append(ip)
            b += 1
            next_burst = now + 3
        producer.poll(0)
        if now >= log_every:
            bk.log(f"{n} records, {len(bursts)} bursts, {len(seen)} address actions seen")
            log_every = now + 10
        time.sleep(0.01)
    producer.flush(60)
    # Let the last bursts through: sources go idle, then everything is judged.
    end = time.monotonic() + 30
    while time.monotonic() < end and len(seen) < len(bursts):
        time.sleep(0.5)
    done.set()
    delays = sorted(arrived - ts for arrived, ts in seen.values())
    pct = lambda p: delays[min(len(delays) - 1, int(round((len(delays) - 1) * p)))]
    print()
    print(f"keywatch second-stage latency: bash scripts/bench-second-stage {seconds} {rate}")
    print(f"traffic: {n:,} benign records at {rate}/s from 3,000 accounts over 6 partitions, in real time, "
          f"and {len(bursts)} credential-stuffing bursts (30 guessed keys, 401 each, from one new address)")
    if not delays:
        print("no address action reached the gateway")
        return
    print(f"address blocks seen by a long-polling gateway: {len(seen)} of {len(bursts)} bursts "
          f"(the last ones, produced within the lateness of the end, may be missing)")
    print(f"record produced -> its stage-two block in the gateway's hands: p50 {pct(0.5):,.0f} ms, "
          f"p99 {pct(0.99):,.0f} ms, max {delays[-1]:,.0f} ms "
          f"(engine.subjects.lateness_secs = {LATENESS}: the wait that puts the second stage in event-time order)")


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
