#!/usr/bin/env python3
"""Where Postgres's time goes during a benchmark, from its own log.

With every statement logged (log_min_duration_statement = 0) and each line
starting with its time (log_line_prefix = '%m [%p] '), this sums the logged
durations per statement (its first words) and per time bucket:

    psql -h 127.0.0.1 -U postgres \
        -c "ALTER SYSTEM SET log_min_duration_statement = 0" \
        -c "ALTER SYSTEM SET log_line_prefix = '%m [%p] '" -c "SELECT pg_reload_conf()"
    from=$(wc -l < /var/log/postgresql/postgresql-15-main.log)
    bash scripts/bench-latency 90 20000
    psql -h 127.0.0.1 -U postgres -c "ALTER SYSTEM RESET log_min_duration_statement" \
        -c "ALTER SYSTEM RESET log_line_prefix" -c "SELECT pg_reload_conf()"
    tail -n +"$from" /var/log/postgresql/postgresql-15-main.log \
        | python3 scripts/pg_statement_times.py --bucket 5

Durations are wall time inside the server, so concurrent sessions add up
(a bucket can hold more seconds than it lasts); bind and parse phases are
marked with `~`. Postgres's own checkpoints are listed as they start and
end. Standard library only.
"""

import argparse
import collections
import datetime
import re
import sys

LINE = re.compile(
    r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) \w+ \[\d+\] LOG:  duration: ([\d.]+) ms\s+(\w+)[^:]*:\s*(.*)"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", nargs="?", help="the log (default: standard input)")
    ap.add_argument("--bucket", type=int, default=5, help="seconds per row (default 5)")
    ap.add_argument("--top", type=int, default=4, help="statements shown per row (default 4)")
    ap.add_argument("--words", type=int, default=3, help="words naming a statement (default 3)")
    args = ap.parse_args()
    lines = (open(args.log, encoding="utf-8", errors="replace") if args.log else sys.stdin).read().split("\n")

    buckets: dict[datetime.datetime, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for i, line in enumerate(lines):
        m = LINE.match(line)
        if not m:
            if " LOG:  checkpoint " in line:
                print(line[:160])
            continue
        at = datetime.datetime.fromisoformat(m.group(1))
        ms, phase, sql = float(m.group(2)), m.group(3), m.group(4)
        j = i + 1
        while j < len(lines) and lines[j].startswith("\t"):
            sql += " " + lines[j].strip()
            j += 1
        name = " ".join(sql.split()[: args.words])[:48]
        if phase in ("bind", "parse"):
            name = "~" + name
        second = at.replace(microsecond=0)
        start = second - datetime.timedelta(seconds=second.second % args.bucket)
        buckets[start][name] += ms
        totals[name] += ms
        counts[name] += 1
    if not totals:
        sys.exit("no 'duration:' lines: is log_min_duration_statement = 0 and the prefix '%m [%p] '?")

    print(f"\nper {args.bucket} s: logged statement time (s), the largest {args.top}")
    for start in sorted(buckets):
        c = buckets[start]
        top = ", ".join(f"{k} {v / 1000:.1f}" for k, v in c.most_common(args.top))
        print(f"{start:%H:%M:%S} {sum(c.values()) / 1000:6.1f} | {top}")
    print("\nwhole log: statement, total s, count, mean ms")
    for name, ms in totals.most_common(15):
        print(f"  {name:50} {ms / 1000:8.1f} {counts[name]:7} {ms / counts[name]:9.1f}")


if __name__ == "__main__":
    main()
