#!/usr/bin/env python3
"""Pools `keywatch replay --json-summary --truth` summaries into the tables
of docs/detection.md: one row per traffic model, per detector and per
attack kind. Usage: quality_report.py MODEL=SUMMARY.json [MODEL=...] ...
(several summaries of one model are pooled)."""

import collections
import json
import math
import sys

CORE = ["request_flood", "token_exhaustion", "prompt_farming", "coordinated_farming", "budget_drain"]
FAST = ["request_flood", "token_exhaustion", "coordinated_farming", "budget_drain"]
# Attacks across accounts, caught by the second stage (issue 15).
CROSS = ["key_cycling", "credential_stuffing", "spread_farming"]


def load(path):
    with open(path) as f:
        line = f.read().strip().splitlines()[-1]
    return json.loads(line)["evaluation"]


def pct(sorted_ms, q):
    if not sorted_ms:
        return None
    return sorted_ms[max(1, math.ceil(q * len(sorted_ms))) - 1]


def human(ms):
    if ms is None:
        return "-"
    s = ms / 1000
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def main():
    models = collections.OrderedDict()
    for arg in sys.argv[1:]:
        name, path = arg.split("=", 1)
        models.setdefault(name, []).append(load(path))

    print("| traffic (runs) | benign user-days | pages | pages per 10k user-days | accounts throttled or blocked | cold-start pages (first 6 h) | core attacks caught | floods, exhaustion, campaigns, drains within 2 min | prompt farming at one repeat a minute, median | attacks across accounts caught |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    detectors = collections.OrderedDict()
    kinds = collections.OrderedDict()
    for name, runs in models.items():
        days = sum(e.get("benign_user_days", 0) for e in runs)
        pages = sum(e["benign_pages"] for e in runs)
        restricted = sum(e["benign_accounts_restricted"] for e in runs)
        cold = sum(e.get("cold_start_pages") or 0 for e in runs)
        lat = collections.defaultdict(list)
        for e in runs:
            for kind, l in e["latencies_ms"]:
                lat[kind].append(l)
            for label, l in e.get("variant_latencies_ms", []):
                lat[label].append(l)
            for det, b in e["benign_by_detector"].items():
                d = detectors.setdefault(det, collections.defaultdict(lambda: [0, 0, 0]))
                d[name][0] += b["pages"]
                d[name][1] += b["info"]
                d[name][2] += b["restrictions"]
        core = [l for k in CORE for l in lat.get(k, [])]
        fast = [l for k in FAST for l in lat.get(k, [])]
        caught = sum(l is not None for l in core)
        quick = sum(l is not None and l <= 120_000 for l in fast)
        farm = sorted(l for l in lat.get("prompt_farming (one repeat a minute)", lat.get("prompt_farming", [])) if l is not None)
        per10k = pages / days * 1e4 if days else 0.0
        core_s = f"{caught}/{len(core)} ({caught / len(core):.3f})" if core else "none injected"
        fast_s = f"{quick}/{len(fast)} ({quick / len(fast):.3f})" if fast else "-"
        cross = [l for k in CROSS for l in lat.get(k, [])]
        cross_n = sum(l is not None for l in cross)
        cross_s = f"{cross_n}/{len(cross)} ({cross_n / len(cross):.3f})" if cross else "none injected"
        print(f"| {name} ({len(runs)}) | {days:,.0f} | {pages} | {per10k:.2f} | {restricted} | {cold} | {core_s} | {fast_s} | {human(pct(farm, 0.5))} | {cross_s} |")
        for k, ls in lat.items():
            kinds.setdefault(k, {})[name] = ls
    print()
    print("Benign alerts per detector (pages / info / throttle-or-block), pooled per traffic model:")
    print()
    print("| detector | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for det, per in detectors.items():
        cells = []
        for name in models:
            p, i, r = per.get(name, [0, 0, 0])
            cells.append(f"{p} / {i} / {r}")
        print(f"| {det} | " + " | ".join(cells) + " |")
    print()
    print("Attacks caught and time to detect (first alert of any severity minus onset, event time):")
    print()
    print("| attack | traffic | caught | within 2 min | p50 | p99 |")
    print("|---|---|---|---|---|---|")
    for k, per in kinds.items():
        for name, ls in per.items():
            found = sorted(l for l in ls if l is not None)
            fast_n = sum(l <= 120_000 for l in found)
            print(f"| {k} | {name} | {len(found)}/{len(ls)} | {fast_n} | {human(pct(found, 0.5))} | {human(pct(found, 0.99))} |")


if __name__ == "__main__":
    main()
