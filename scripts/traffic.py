#!/usr/bin/env python3
"""Independent gateway-traffic models for judging keywatch's detectors.

Written apart from keywatch's own simulator (sim/src/) and
from the detectors' thresholds: nothing here reads keywatch's config or
code. Two models, both writing canonical gateway records (NDJSON, in
event-time order) and a ground-truth file that `keywatch replay --truth`
scores against:

  gateway   A population of accounts on the three built-in tiers, with the
            benign behaviours that stress each detector (cap hitters,
            big-tier accounts at low rates, health checks and cron jobs,
            retry storms after 429/5xx, batch jobs at 3-5x, offices behind
            one NAT address, mobile users whose address changes, accounts
            arriving all day, daily and weekly cycles, growing chat
            contexts, regenerations) and labelled attacks at the edge of
            each rule. Every spread is drawn per seed. Prompt and output
            sizes are re-sampled from the real request traces in
            ../shared/real-traces (Azure 2023 code and conversation,
            Mooncake) when they are there, else from log-normals fitted to
            the statistics in that folder's README.

  servegen  Real API customers: Alibaba Bailian's per-client workload
            (ServeGen, m-large clients of up to 20,000 requests a day):
            each client's measured 10-minute request rates, inter-arrival
            CVs and token distributions re-sampled into requests, on one
            tier whose limits are too high to matter. All benign. Needs
            the ServeGen data; clients are split by number, even for
            tuning and odd for evaluation (--clients).

Usage:
  python3 scripts/traffic.py gateway --users 6000 --hours 36 --seed 101 \
      -o run.ndjson --truth run.truth.json [--traces DIR]
  python3 scripts/traffic.py servegen --clients odd --days 3 --seed 1 \
      -o run.ndjson --truth run.truth.json --config run.toml [--traces DIR]

Only the standard library is used.
"""

import argparse
import ast
import bisect
import csv
import hashlib
import heapq
import io
import json
import math
import os
import random
import sys
import tarfile

MIN = 60_000
HOUR = 60 * MIN
DAY = 24 * HOUR
# 2026-11-23T00:00:00Z, a Monday.
EPOCH_MONDAY = 1_795_392_000_000

# The three built-in tiers as the README documents them (public plan limits,
# not detector settings): requests/min, tokens/day, max output, $/day.
TIERS = {
    "free": (10, 10_000, 500, 1.0),
    "pro": (60, 100_000, 4_000, 50.0),
    "enterprise": (300, 1_000_000, 8_000, 500.0),
}

# List prices, USD per 1M tokens (input, output); the same public 2025
# figures every gateway's price table carries.
MODELS = {
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.4, 1.6),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-3-5-haiku": (0.8, 4.0),
    "gemini-2.0-flash": (0.1, 0.4),
}
CHEAP_MODELS = ["gpt-4o-mini", "gpt-4.1-mini", "gemini-2.0-flash", "claude-3-5-haiku"]
RICH_MODELS = ["gpt-4o", "gpt-4.1", "claude-sonnet-4"]

USER_AGENTS = [
    "OpenAI/Python 1.54.4",
    "OpenAI/Python 1.58.1",
    "AsyncOpenAI/Python 1.57.0",
    "anthropic-sdk-python/0.40.0",
    "langchain/0.3.9",
    "llama-index/0.12.2",
    "node-fetch/1.0",
    "OpenAI/JS 4.73.0",
    "curl/8.5.0",
    "Go-http-client/2.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/130.0.0.0 Safari/537.36",
]
ATTACK_AGENTS = ["python-requests/2.32.3", "aiohttp/3.10.10", "Go-http-client/1.1", "okhttp/4.12.0"]

# Autonomous systems: (asn, first octet, second octet range) of access
# (residential / mobile) and hosting networks.
ACCESS_ASNS = [(7922, 73), (701, 71), (7018, 99), (3320, 79), (2856, 86), (12322, 88),
               (4766, 121), (55836, 49), (1221, 101), (6830, 84), (5089, 82), (3269, 87)]
MOBILE_ASNS = [(21928, 172), (22394, 174), (20057, 166), (3352, 83)]
HOSTING_ASNS = [(16509, 3), (14618, 54), (15169, 34), (8075, 20), (14061, 167), (24940, 88),
                (16276, 51), (63949, 45), (20473, 45), (9009, 185), (60068, 89), (36352, 23)]

ERROR_STATUSES = [429, 500, 502, 503]


def fmt_ts(ms):
    s, milli = divmod(ms, 1000)
    days, rem = divmod(s, 86400)
    hh, rem = divmod(rem, 3600)
    mm, ss = divmod(rem, 60)
    # Civil date from days since 1970 (Howard Hinnant's algorithm).
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    if m <= 2:
        y += 1
    return f"{y:04d}-{m:02d}-{d:02d}T{hh:02d}:{mm:02d}:{ss:02d}.{milli:03d}Z"


def hexid(rng, n=16):
    return "%0*x" % (n, rng.getrandbits(4 * n))


# ---------------------------------------------------------------------------
# Sizes: re-sampled from real request traces when present.

class Sizes:
    """Prompt and output token sizes of three request shapes."""

    def __init__(self, traces, rng):
        self.source = "log-normal fallback (no real traces found)"
        self.shapes = {}
        if traces:
            try:
                self._load(traces)
                self.source = f"real traces in {traces}"
            except (OSError, ValueError) as e:
                print(f"traffic.py: could not read real traces ({e}); using log-normals",
                      file=sys.stderr)
                self.shapes = {}
        if not self.shapes:
            # Medians and tails from ../shared/real-traces/README.md:
            # conversation output p50 129, p99 601; code output p50 13,
            # p99 252; long-context (Mooncake) output p50 350, p99 1,120.
            def ln(med, p99):
                sigma = math.log(p99 / med) / 2.326
                return [(max(1, int(rng.lognormvariate(math.log(med), sigma)))) for _ in range(4000)]
            self.shapes = {
                "chat": (ln(1000, 6000), ln(129, 601)),
                "code": (ln(2000, 7500), ln(13, 252)),
                "long": (ln(7000, 16000), ln(350, 1120)),
            }

    def _load(self, root):
        def azure(name):
            p = os.path.join(root, "azure2023", name)
            with open(p, newline="") as f:
                rows = list(csv.reader(f))[1:]
            return ([int(r[1]) for r in rows if len(r) == 3], [int(r[2]) for r in rows if len(r) == 3])
        self.shapes["chat"] = azure("AzureLLMInferenceTrace_conv.csv")
        self.shapes["code"] = azure("AzureLLMInferenceTrace_code.csv")
        ins, outs = [], []
        with open(os.path.join(root, "mooncake", "conversation_trace.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                ins.append(int(r["input_length"]))
                outs.append(int(r["output_length"]))
        self.shapes["long"] = (ins, outs)

    def draw(self, rng, shape):
        ins, outs = self.shapes[shape]
        i = rng.randrange(len(ins))
        return max(1, ins[i]), max(1, outs[i])


# ---------------------------------------------------------------------------
# Records.

class Out:
    """Collects records as (ts, seq, line) and writes them in time order."""

    def __init__(self, rng):
        self.rows = []
        self.seq = 0
        self.rng = rng

    def add(self, ts, rec):
        self.seq += 1
        self.rows.append((ts, self.seq, rec))

    def write(self, path):
        self.rows.sort(key=lambda r: (r[0], r[1]))
        f = sys.stdout if path == "-" else open(path, "w")
        for ts, _, rec in self.rows:
            f.write(json.dumps(rec, separators=(",", ":")))
            f.write("\n")
        if f is not sys.stdout:
            f.close()
        return len(self.rows)


def cost_of(model, pt, ct):
    i, o = MODELS[model]
    return (pt * i + ct * o) / 1e6


class Account:
    """What a gateway knows about one account and how it logs."""

    def __init__(self, rng, uid, tier, arrival):
        self.uid = uid
        self.tier = tier
        self.arrival = arrival
        self.keys = [f"key_{hexid(rng, 10)}" for _ in range(1 + (rng.random() < 0.3) + (rng.random() < 0.1))]
        self.split = False
        self.cost_share = 0.7
        self.model = rng.choice(CHEAP_MODELS if rng.random() < 0.7 else RICH_MODELS)
        self.ua = rng.choice(USER_AGENTS)
        asn, o1 = rng.choice(ACCESS_ASNS)
        self.asn = asn
        self.ip = f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        self.mobile = None
        self.scale_in = 1.0
        self.scale_out = 1.0
        self.cap_share = 0.0
        self.ctx = None  # growing chat context (tokens), or None
        self.day = None
        self.tokens_today = 0
        self.spend_today = 0.0
        self.day_share = 1.0
        self.regen = 0.0

    def address(self, rng):
        if self.mobile:
            asn, o1 = self.mobile
            return f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", asn
        return self.ip, self.asn


def emit(out, rng, acct, ts, *, key=None, pt, ct, status=200, model=None, fp=None,
         ip=None, asn=None, ua=None, latency=None, endpoint="/v1/chat/completions"):
    """One request as the gateway logs it: an exchange record, or a request
    and a later response record for split-logging accounts."""
    model = model or acct.model
    key = key or acct.keys[0]
    if ip is None:
        ip, asn = acct.address(rng)
    if latency is None:
        latency = int(300 + ct * rng.uniform(15, 40) + rng.expovariate(1 / 400))
    if status != 200:
        ct = 0
        latency = int(rng.uniform(20, 2000))
    rid = "req_" + hexid(rng, 20)
    base = {
        "ts": fmt_ts(ts),
        "request_id": rid,
        "user_id": acct.uid,
        "key_id": key,
        "tier": acct.tier,
        "ip": ip,
        "asn": asn,
        "user_agent": ua or acct.ua,
        "endpoint": endpoint,
        "model": model,
    }
    if fp is None:
        fp = hexid(rng, 16)
    cost = round(cost_of(model, pt, ct), 8)
    with_cost = rng.random() < acct.cost_share
    if acct.split:
        req = dict(base, phase="request", prompt_tokens=pt, prompt_fingerprint=fp)
        out.add(ts, req)
        end = ts + latency
        resp = dict(base, phase="response", ts=fmt_ts(end), status=status,
                    prompt_tokens=pt, completion_tokens=ct, latency_ms=latency)
        if with_cost:
            resp["cost_usd"] = cost
        out.add(end, resp)
    else:
        rec = dict(base, status=status, prompt_tokens=pt, completion_tokens=ct,
                   latency_ms=latency, prompt_fingerprint=fp)
        if with_cost:
            rec["cost_usd"] = cost
        out.add(ts, rec)


# ---------------------------------------------------------------------------
# The gateway model.

class Spread:
    """Per-seed spreads of the population: every share and scale drawn."""

    def __init__(self, rng):
        u = rng.uniform
        self.tier_mix = (u(0.5, 0.7), u(0.2, 0.35))  # free, pro; the rest enterprise
        self.split = u(0.08, 0.2)
        self.cap_hitters = u(0.1, 0.25)
        self.cap_share = (0.1, 0.4)
        self.batch = u(0.1, 0.25)
        self.batch_mult = (3.0, 5.0)
        self.health = u(0.01, 0.03)
        self.cron = u(0.03, 0.08)
        self.nat_offices = int(u(3, 10))
        self.mobile = u(0.1, 0.25)
        self.late_arrivals = u(0.05, 0.2)
        self.weekend = u(0.35, 0.8)
        self.trough = u(0.05, 0.4)
        self.peak_hour = u(12, 20)
        self.error_rate = u(0.005, 0.03)
        self.storms = int(u(1, 4))
        self.regen = u(0.01, 0.05)
        self.services = u(0.2, 0.4)  # share of paying accounts that are back ends


def cycle(sp, ts):
    hour = (ts % DAY) / HOUR
    daily = sp.trough + (1 - sp.trough) * 0.5 * (1 + math.cos(2 * math.pi * (hour - sp.peak_hour) / 24))
    weekday = ((ts - EPOCH_MONDAY) // DAY) % 7
    return daily * (sp.weekend if weekday >= 5 else 1.0)


def gamma_gap(rng, mean, cv):
    k = 1.0 / (cv * cv)
    return rng.gammavariate(k, mean / k)


def sized(rng, sizes, acct, shape):
    pt, ct = sizes.draw(rng, shape)
    pt = max(1, int(pt * acct.scale_in))
    ct = max(1, int(ct * acct.scale_out))
    cap = TIERS[acct.tier][2]
    if acct.cap_share and rng.random() < acct.cap_share:
        ct = cap
    return pt, min(ct, cap)


def benign_request(out, rng, sizes, sp, acct, ts, shape, storm_until):
    """A request, with the client's retries when the gateway answers 429/5xx."""
    day = ts // DAY
    if acct.day != day:
        acct.day, acct.tokens_today, acct.spend_today = day, 0, 0.0
    _, tokens_per_day, _, budget = TIERS[acct.tier]
    if (acct.tokens_today > acct.day_share * tokens_per_day
            or acct.spend_today > acct.day_share * budget):
        return ts
    pt, ct = sized(rng, sizes, acct, shape)
    if acct.ctx is not None:
        # A chat turn carries the conversation so far, as far as the plan
        # lets it grow (a fifth of its daily tokens; at most 120,000).
        pt = min(pt + acct.ctx, 120_000, tokens_per_day // 5)
        acct.ctx += pt // 8 + ct
    acct.tokens_today += pt + ct
    acct.spend_today += cost_of(acct.model, pt, ct)
    fp = hexid(rng, 16)
    key = acct.keys[0] if len(acct.keys) == 1 or rng.random() < 0.8 else rng.choice(acct.keys)
    t = ts
    failing = ts < storm_until
    for attempt in range(8):
        err = failing or rng.random() < sp.error_rate
        if not err or attempt == 7:
            emit(out, rng, acct, t, key=key, pt=pt, ct=ct, fp=fp)
            break
        emit(out, rng, acct, t, key=key, pt=pt, ct=0, fp=fp, status=rng.choice(ERROR_STATUSES))
        t += int(min(30_000, 500 * 2 ** attempt) * rng.uniform(0.5, 1.5))
        failing = t < storm_until
    if rng.random() < acct.regen:
        # Regenerate: the same prompt again a little later.
        for _ in range(rng.randint(1, 2)):
            t += int(rng.uniform(8_000, 90_000))
            pt2, ct2 = sized(rng, sizes, acct, shape)
            emit(out, rng, acct, t, key=key, pt=pt, ct=ct2, fp=fp)
    return t


def gateway(args):
    rng = random.Random(args.seed)
    sp = Spread(rng)
    sizes = Sizes(args.traces, random.Random(args.seed ^ 0x5EED))
    start = EPOCH_MONDAY + DAY * rng.randrange(7)
    end = start + int(args.hours * HOUR)
    out = Out(rng)
    accounts = []
    user_days = 0.0

    # Offices: one NAT address shared by many accounts.
    offices = []
    for _ in range(sp.nat_offices):
        asn, o1 = rng.choice(ACCESS_ASNS)
        offices.append((f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", asn))

    for n in range(args.users):
        u = rng.random()
        tier = "free" if u < sp.tier_mix[0] else "pro" if u < sp.tier_mix[0] + sp.tier_mix[1] else "enterprise"
        arrival = start
        if rng.random() < sp.late_arrivals:
            arrival = start + int(rng.uniform(0, end - start - HOUR))
        a = Account(rng, f"u{args.seed}_{n:06d}", tier, arrival)
        a.split = rng.random() < sp.split
        a.cost_share = rng.choice([0.0, 1.0, 1.0, 0.5])
        if rng.random() < sp.mobile:
            a.mobile = rng.choice(MOBILE_ASNS)
        if offices and rng.random() < 0.08:
            a.ip, a.asn = rng.choice(offices)
        if rng.random() < sp.cap_hitters:
            a.cap_share = rng.uniform(*sp.cap_share)
        a.scale_in = rng.lognormvariate(0, 0.6)
        a.scale_out = rng.lognormvariate(0, 0.5)
        accounts.append(a)
        user_days += (end - arrival) / DAY

    rpm = {t: v[0] for t, v in TIERS.items()}
    traits = {}
    for a in accounts:
        service = a.tier != "free" and rng.random() < sp.services
        if a.tier == "enterprise" and rng.random() < 0.4:
            # A big plan with a small appetite.
            base_rate = rng.uniform(0.05, 1.2)
        elif service:
            base_rate = rng.lognormvariate(math.log(0.005 * rpm[a.tier]), 1.0)
        else:
            base_rate = rng.lognormvariate(math.log(0.012), 1.1)  # requests/min, heavy-tailed
        base_rate = min(base_rate, 0.3 * rpm[a.tier])
        shape = rng.choice(["chat", "chat", "code", "long"] if service else ["chat", "chat", "chat", "long"])
        if not service and rng.random() < 0.5:
            a.ctx = 0
        # People regenerate answers now and then, some never; back ends do not.
        if not service and rng.random() < 0.5:
            a.regen = rng.uniform(0.3, 1.7) * sp.regen
        # Prompts on a small plan are small: the plan's daily tokens are.
        a.scale_in *= {"free": 0.15, "pro": 0.5, "enterprise": 1.0}[a.tier]
        # Most accounts stop near their plan's day; a few go past it.
        a.day_share = rng.uniform(0.5, 0.95) if rng.random() < 0.9 else rng.uniform(1.0, 1.5)
        traits[a.uid] = (service, base_rate, shape)

    # Provider incidents: every account of a share fails for a few minutes
    # and its clients retry.
    storms = []
    for _ in range(sp.storms):
        s0 = start + int(rng.uniform(0, end - start))
        storms.append((s0, s0 + int(rng.uniform(2, 10) * MIN), rng.uniform(0.05, 0.3)))

    for a in accounts:
        service, rate, shape = traits[a.uid]
        batch = service and rng.random() < sp.batch / max(sp.services, 0.01)
        storm_for = [(s, e) for s, e, share in storms if rng.random() < share]
        t = a.arrival
        if service:
            # A back end: a renewal process with bursty gaps, modulated by the cycle.
            cv = rng.uniform(0.8, 3.0)
            next_batch = t + int(rng.expovariate(1 / (6 * HOUR))) if batch else end
            while t < end:
                t += int(gamma_gap(rng, MIN / rate, cv))
                if t >= end:
                    break
                if rng.random() > cycle(sp, t):
                    continue
                storm_until = max([e for s, e in storm_for if s <= t < e], default=0)
                benign_request(out, rng, sizes, sp, a, t, shape, storm_until)
                if t >= next_batch:
                    # A batch job: 5-20 minutes at 3-5 times the usual rate.
                    mult = rng.uniform(*sp.batch_mult)
                    b_end = t + int(rng.uniform(5, 20) * MIN)
                    while t < b_end and t < end:
                        t += int(rng.expovariate(rate * mult / MIN))
                        benign_request(out, rng, sizes, sp, a, t, shape, 0)
                    next_batch = t + int(rng.expovariate(1 / (8 * HOUR)))
        else:
            # People: sessions of a few requests, tens of seconds apart.
            sess_per_day = rate * 1440 / 4
            while t < end:
                t += int(rng.expovariate(max(sess_per_day, 1e-3) / DAY))
                if t >= end:
                    break
                if rng.random() > cycle(sp, t):
                    continue
                if a.ctx is not None:
                    a.ctx = 0
                for _ in range(1 + int(rng.expovariate(1 / 3))):
                    storm_until = max([e for s, e in storm_for if s <= t < e], default=0)
                    t = benign_request(out, rng, sizes, sp, a, t, shape, storm_until)
                    t += int(rng.uniform(10_000, 120_000))
                    if t >= end:
                        break

        if rng.random() < sp.health:
            # An uptime monitor: the same tiny prompt every 1-10 minutes.
            every = rng.uniform(1, 10) * MIN
            fp = hexid(rng, 16)
            pt = rng.randint(3, 20)
            hk = a.keys[-1]
            t = a.arrival + int(rng.uniform(0, every))
            while t < end:
                emit(out, rng, a, t, key=hk, pt=pt, ct=rng.randint(1, 3), fp=fp, ua="uptime-monitor/2.1",
                     model=rng.choice(CHEAP_MODELS[:1]) if rng.random() < 0.01 else None)
                t += int(every * rng.uniform(0.98, 1.02))
        if rng.random() < sp.cron:
            # A scheduled job: an hourly report with the same prompt, or one
            # every 15 minutes with fresh data in it.
            hourly = rng.random() < 0.5
            every = HOUR if hourly else 15 * MIN
            fp = hexid(rng, 16)
            t = a.arrival + int(rng.uniform(0, every))
            while t < end:
                pt, ct = sized(rng, sizes, a, "code")
                emit(out, rng, a, t, pt=pt, ct=ct, fp=fp if hourly else None)
                t += int(every + rng.uniform(-5_000, 5_000))

    attacks = plan_attacks(rng, sp, sizes, accounts, traits, start, end, out, args.attacks)
    # Attacks across accounts, on a generator of their own: every record and
    # attack above is what it was before they existed.
    attacks += plan_cross_attacks(random.Random(args.seed ^ 0xC2055), sizes, start, end, out,
                                  max(3, args.attacks // 10))
    attacks.sort(key=lambda x: x["onset_ms"])
    n = out.write(args.output)
    truth = {"benign_user_days": round(user_days, 3), "attacks": attacks, "start_ms": start,
             "model": "gateway", "seed": args.seed, "sizes": sizes.source}
    with open(args.truth, "w") as f:
        json.dump(truth, f, indent=1)
    print(f"traffic.py gateway: {n} records, {len(attacks)} attack entries, {user_days:.0f} user-days; sizes from {sizes.source}",
          file=sys.stderr)


def stolen_context(rng):
    asn, o1 = rng.choice(HOSTING_ASNS)
    ip = f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    return ip, asn, rng.choice(ATTACK_AGENTS)


def plan_attacks(rng, sp, sizes, accounts, traits, start, end, out, per_run):
    attacks = []
    mix = [("request_flood", 0.25), ("token_exhaustion", 0.22), ("prompt_farming", 0.18),
           ("budget_drain", 0.15), ("leaked_key", 0.12), ("coordinated_farming", 0.08)]
    kinds = []
    for k, share in mix:
        kinds += [k] * max(1, round(per_run * share))
    rng.shuffle(kinds)
    used = set()
    for kind in kinds:
        onset = start + int(rng.uniform(2 * HOUR, end - start - 2 * HOUR))
        cands = [a for a in accounts if a.uid not in used and a.arrival < onset - HOUR]
        if kind == "request_flood":
            cands = [a for a in cands if a.tier != "free"] or cands
        # Keys that are in use are the ones abused: victims are drawn by
        # activity (its square root: quiet accounts are victims too).
        a = rng.choices(cands, weights=[math.sqrt(traits[c.uid][1]) for c in cands])[0]
        used.add(a.uid)
        service, rate, shape = traits[a.uid]
        key = a.keys[0]
        variant = None
        stolen = rng.random() < 0.5
        ip = asn = ua = None
        if stolen:
            ip, asn, ua = stolen_context(rng)
        if kind == "request_flood":
            variant = "stolen key" if stolen else "owner's script"
            per_min = max(rng.uniform(20, 50) * rate, rng.uniform(15, 30))
            dur = rng.uniform(8, 20) * MIN
            t, stop = onset, onset + dur
            first = None
            while t < stop:
                pt, ct = sized(rng, sizes, a, shape)
                emit(out, rng, a, int(t), key=key, pt=pt, ct=ct, ip=ip, asn=asn, ua=ua)
                first = first or int(t)
                t += rng.expovariate(per_min / MIN)
            attacks.append(dict(kind=kind, user_id=a.uid, key_id=key, onset_ms=first, end_ms=int(stop), variant=variant))
        elif kind == "token_exhaustion":
            variant = a.tier
            cap = TIERS[a.tier][2]
            med_prompt = sorted(sizes.draw(rng, shape)[0] * a.scale_in for _ in range(51))[25]
            per_min = rng.uniform(1.0, 3.0)
            dur = rng.uniform(10, 30) * MIN
            t, stop = onset, onset + dur
            first = None
            while t < stop:
                pt = int(max(4000, med_prompt * rng.uniform(6, 15)) * rng.uniform(0.8, 1.2))
                emit(out, rng, a, int(t), key=key, pt=pt, ct=cap, ip=ip, asn=asn, ua=ua,
                     latency=int(cap * rng.uniform(20, 35)))
                first = first or int(t)
                t += rng.uniform(0.6, 1.4) * MIN / per_min
            attacks.append(dict(kind=kind, user_id=a.uid, key_id=key, onset_ms=first, end_ms=int(stop), variant=variant))
        elif kind == "prompt_farming":
            slow = rng.random() < 0.25
            variant = "just over the hourly rule" if slow else "one repeat a minute"
            fp = hexid(rng, 16)
            pt = rng.randint(20, 400)
            gap = (HOUR / rng.uniform(7, 9)) if slow else MIN
            dur = (rng.uniform(70, 120) if slow else rng.uniform(20, 50)) * MIN
            t, stop = onset, onset + dur
            first = None
            while t < stop:
                ct = min(TIERS[a.tier][2], rng.randint(150, 900))
                emit(out, rng, a, int(t), key=key, pt=pt, ct=ct, fp=fp)
                first = first or int(t)
                t += gap * rng.uniform(0.8, 1.2)
            attacks.append(dict(kind=kind, user_id=a.uid, key_id=key, onset_ms=first, end_ms=int(stop), variant=variant))
        elif kind == "budget_drain":
            # Expensive requests fast enough to empty the day's budget in
            # 30-90 minutes, at no more than about twice the usual rate.
            model = rng.choice(RICH_MODELS)
            budget = TIERS[a.tier][3]
            minutes = rng.uniform(30, 90)
            cap = TIERS[a.tier][2]
            per_min = max(2.0 * rate, 0.5)
            cost = budget / minutes / per_min
            # Grow the request until one costs that much.
            i, o = MODELS[model]
            ct = int(cap * rng.uniform(0.5, 0.7))
            pt = int(max(200, (cost * 1e6 - ct * o) / i))
            pt = min(pt, 100_000)
            cost_one = cost_of(model, pt, ct)
            per_min = budget / minutes / cost_one
            variant = a.tier
            t, stop = onset, onset + minutes * MIN * 1.1
            first = None
            while t < stop:
                emit(out, rng, a, int(t), key=key, pt=pt, ct=ct, model=model, ip=ip, asn=asn, ua=ua)
                first = first or int(t)
                t += rng.expovariate(per_min / MIN)
            attacks.append(dict(kind=kind, user_id=a.uid, key_id=key, onset_ms=first, end_ms=int(stop), variant=variant))
        elif kind == "leaked_key":
            n_ips = rng.randint(30, 150)
            addrs = [stolen_context(rng) for _ in range(n_ips)]
            per_min = rng.uniform(5, 30)
            dur = rng.uniform(30, 90) * MIN
            t, stop = onset, onset + dur
            first = None
            while t < stop:
                ip, asn, ua = rng.choice(addrs)
                pt, ct = sized(rng, sizes, a, "chat")
                emit(out, rng, a, int(t), key=key, pt=pt, ct=ct, ip=ip, asn=asn, ua=ua)
                first = first or int(t)
                t += rng.expovariate(per_min / MIN)
            attacks.append(dict(kind=kind, user_id=a.uid, key_id=key, onset_ms=first, end_ms=int(stop)))
        elif kind == "coordinated_farming":
            n_acc = rng.randint(20, 50)
            fp = hexid(rng, 16)
            pt = rng.randint(30, 300)
            ip, asn, ua = stolen_context(rng)
            members = []
            last = onset
            for m in range(n_acc):
                acct = Account(rng, f"f{rng.getrandbits(32):08x}", "free", onset)
                acct.ip, acct.asn, acct.ua = ip, asn, ua
                t = onset + int(rng.uniform(0, 60_000))
                first = t
                for _ in range(rng.randint(3, 6)):
                    emit(out, rng, acct, t, pt=pt, ct=rng.randint(200, 500), fp=fp)
                    t += int(rng.uniform(15_000, 60_000))
                last = max(last, t)
                members.append((acct, first))
            head = members[0][0]
            attacks.append(dict(kind=kind, user_id=head.uid, key_id=None, onset_ms=onset, end_ms=last))
            for acct, _ in members:
                attacks.append(dict(kind=kind, user_id=acct.uid, key_id=acct.keys[0], onset_ms=onset, end_ms=last))
    attacks.sort(key=lambda x: x["onset_ms"])
    # Campaign members must follow their head.
    return attacks


def plan_cross_attacks(rng, sizes, start, end, out, count):
    """Abuse spanning accounts, each a group in the truth (a head entry with
    no key, then one per account): throwaway free accounts cycled from one
    address (a hosting network or a residential one), credential stuffing
    (guessed keys refused with 401 or 403 from one address; the gateway
    names the guess as the account), and one prompt farmed by many accounts
    behind residential proxies, each sending it only two or three times."""
    attacks = []
    kinds = ["key_cycling", "credential_stuffing", "spread_farming"]
    for i in range(count):
        kind = kinds[i] if i < len(kinds) else rng.choice(kinds)
        onset = start + int(rng.uniform(2 * HOUR, end - start - 2 * HOUR))
        group = []
        if kind == "key_cycling":
            hosting = rng.random() < 0.5
            if hosting:
                ip, asn, ua = stolen_context(rng)
            else:
                asn, o1 = rng.choice(ACCESS_ASNS)
                ip, ua = f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", rng.choice(ATTACK_AGENTS)
            stop = onset + int(rng.uniform(20, 40) * MIN)
            for _ in range(rng.randint(12, 40)):
                acct = Account(rng, f"c{rng.getrandbits(32):08x}", "free", onset)
                acct.ip, acct.asn, acct.ua = ip, asn, ua
                t = onset + int(rng.uniform(0, (stop - onset) / 3))
                for _ in range(rng.randint(5, 10)):
                    pt, ct = sized(rng, sizes, acct, "chat")
                    emit(out, rng, acct, t, pt=pt, ct=ct)
                    t += int(rng.uniform(1, 5) * MIN)
                group.append(acct)
            variant = "from a hosting network" if hosting else "from a residential address"
        elif kind == "credential_stuffing":
            ip, asn, ua = stolen_context(rng)
            stop = onset + int(rng.uniform(5, 20) * MIN)
            guesses = rng.randint(40, 250)
            for g in range(guesses):
                acct = Account(rng, f"kh_{hexid(rng, 16)}", "free", onset)
                acct.keys = [acct.uid]
                acct.ip, acct.asn, acct.ua = ip, asn, ua
                t = onset + (stop - onset) * g // guesses
                for _ in range(rng.randint(1, 2)):
                    emit(out, rng, acct, t, pt=rng.randint(10, 200), ct=0,
                         status=401 if rng.random() < 0.9 else 403)
                    t += int(rng.uniform(500, 5000))
                group.append(acct)
            variant = None
        else:
            fp = hexid(rng, 16)
            pt = rng.randint(30, 300)
            stop = onset + int(rng.uniform(20, 40) * MIN)
            for _ in range(rng.randint(25, 60)):
                acct = Account(rng, f"s{rng.getrandbits(32):08x}", "free", onset)
                t = onset + int(rng.uniform(0, (stop - onset) / 2))
                for _ in range(rng.randint(2, 3)):
                    emit(out, rng, acct, t, pt=pt, ct=rng.randint(150, 450), fp=fp)
                    t += int(rng.uniform(2, 6) * MIN)
                group.append(acct)
            variant = None
        head = dict(kind=kind, user_id=group[0].uid, key_id=None, onset_ms=onset, end_ms=stop)
        if variant:
            head["variant"] = variant
        attacks.append(head)
        for a in group:
            e = dict(kind=kind, user_id=a.uid, key_id=a.keys[0], onset_ms=onset, end_ms=stop)
            if variant:
                e["variant"] = variant
            attacks.append(e)
    return attacks


# ---------------------------------------------------------------------------
# The ServeGen model.

def servegen(args):
    root = args.traces
    base = os.path.join(root or "", "servegen", "data", "language", "m-large") if root else ""
    if not root or not os.path.isdir(base):
        print("traffic.py servegen: the ServeGen data (../shared/real-traces/servegen) is not here; nothing to do",
              file=sys.stderr)
        sys.exit(3)
    rng = random.Random(args.seed)
    pmfs = {}
    tgz = os.path.join(root, "servegen", "datasets_json.tgz")
    with tarfile.open(tgz) as tf:
        for m in tf.getmembers():
            if "/language/m-large/" in m.name and m.name.endswith("-dataset.json"):
                client = int(m.name.rsplit("chunk-", 1)[1].split("-")[0])
                pmfs[client] = json.load(tf.extractfile(m))
    windows_per_day = 144
    days = int(args.days)
    clients = []
    for name in sorted(os.listdir(base)):
        client = int(name.split("-")[1])
        if args.clients == "even" and client % 2:
            continue
        if args.clients == "odd" and client % 2 == 0:
            continue
        rows = []
        with open(os.path.join(base, name)) as f:
            for r in csv.reader(f):
                rows.append((int(float(r[0])), float(r[1]), float(r[2]) if r[2] else 0.0))
        per_day = [sum(r[1] * 600 for r in rows[d * windows_per_day:(d + 1) * windows_per_day])
                   for d in range(len(rows) // windows_per_day)]
        if not per_day or sum(per_day) / len(per_day) > args.max_per_day or sum(per_day) == 0:
            continue
        clients.append((client, rows))
    start = EPOCH_MONDAY
    end = start + days * DAY
    out = Out(rng)
    user_days = 0.0
    parsed = {}

    # 55 clients' token distributions are missing from the public copy
    # (MISSING_dataset_files.txt): such a client borrows another's.
    have = sorted(pmfs)
    borrowed = {c: rng.choice(have) for c, _ in clients if c not in pmfs}

    def sampler(client, window_start_s):
        client = borrowed.get(client, client)
        d = pmfs[client]
        keys = sorted(int(k) for k in d)
        k = keys[max(0, bisect.bisect_right(keys, window_start_s % (14 * 86400)) - 1)]
        if (client, k) not in parsed:
            entry = d[str(k)]
            def cdf(s):
                pm = ast.literal_eval(s)
                vals = sorted(pm)
                acc, cum = 0.0, []
                for v in vals:
                    acc += pm[v]
                    cum.append(acc)
                return vals, cum
            parsed[(client, k)] = (cdf(entry["input_tokens"]), cdf(entry["output_tokens"]))
        return parsed[(client, k)]

    def draw(c, r):
        vals, cum = c
        i = bisect.bisect_left(cum, r * cum[-1])
        return max(1, int(vals[min(i, len(vals) - 1)]))

    for client, rows in clients:
        acct = Account(rng, f"bailian_{client:03d}", "api", start)
        acct.model = rng.choice(list(MODELS))
        asn, o1 = rng.choice(HOSTING_ASNS)
        ips = [f"{o1}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(rng.randint(1, 4))]
        acct.asn = asn
        acct.split = rng.random() < 0.1
        first_day = rng.randrange(max(1, len(rows) // windows_per_day - days + 1))
        t = start
        for w in range(days * windows_per_day):
            idx = first_day * windows_per_day + w
            if idx >= len(rows):
                break
            ws, rate, cv = rows[idx]
            w_start = start + w * 600_000
            w_end = w_start + 600_000
            if rate <= 0:
                continue
            cv = cv if cv > 0 else 1.0
            t = w_start + gamma_gap(rng, 1000 / rate, cv) * rng.random()
            ins, outs = sampler(client, ws)
            while t < w_end:
                pt = draw(ins, rng.random())
                ct = draw(outs, rng.random())
                acct.ip = rng.choice(ips)
                emit(out, rng, acct, int(t), pt=pt, ct=ct, latency=int(200 + ct * rng.uniform(10, 30)))
                t += gamma_gap(rng, 1000 / rate, cv)
        user_days += days
    n = out.write(args.output)
    with open(args.truth, "w") as f:
        json.dump({"benign_user_days": user_days, "attacks": [], "start_ms": start, "model": "servegen",
                   "clients": args.clients}, f)
    with open(args.config, "w") as f:
        f.write("# ServeGen replay: one tier whose limits are too high to matter.\n"
                "[engine]\ndefault_tier = \"api\"\n\n[engine.tiers.api]\n"
                "requests_per_minute = 600\ntokens_per_day = 100000000000\n"
                "max_output_tokens = 8192\ndaily_budget_usd = 1000000.0\n")
    print(f"traffic.py servegen: {n} records from {len(clients)} clients ({args.clients}; {len(borrowed)} with"
          f" borrowed token distributions), {user_days:.0f} user-days",
          file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="model", required=True)
    here = os.path.dirname(os.path.abspath(__file__))
    default_traces = os.path.normpath(os.path.join(here, "..", "..", "shared", "real-traces"))
    for name in ("gateway", "servegen"):
        p = sub.add_parser(name)
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--truth", required=True)
        p.add_argument("--seed", type=int, default=101)
        p.add_argument("--traces", default=default_traces if os.path.isdir(default_traces) else None,
                       help="the real-traces folder (default ../shared/real-traces beside the project, when present)")
        if name == "gateway":
            p.add_argument("--users", type=int, default=6000)
            p.add_argument("--hours", type=float, default=36)
            p.add_argument("--attacks", type=int, default=60, help="attacks per run (about)")
        else:
            p.add_argument("--clients", choices=["even", "odd", "all"], default="odd")
            p.add_argument("--days", type=int, default=3)
            p.add_argument("--max-per-day", type=float, default=20_000,
                           help="clients with more requests a day than this, on average over the 14 days, are left out")
            p.add_argument("--config", required=True)
    args = ap.parse_args()
    if args.model == "gateway":
        gateway(args)
    else:
        servegen(args)


if __name__ == "__main__":
    main()
