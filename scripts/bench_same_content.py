"""The same requests as a gateway's file, as canonical events carrying the
same content: ids, tokens, status, latency, address, agent, endpoint,
model and, as `prompt`, the prompt text the adapter fingerprints (Kong's
logged body, LiteLLM's and APISIX's messages). The baseline of
scripts/bench-formats-same-content: a canonical event with a fingerprint
only is ten times smaller than a gateway's record holding the prompt, so
the adapters are also measured against a canonical decoder doing the same
work.

    python3 scripts/bench_same_content.py FORMAT GATEWAY.ndjson OUT.ndjson
"""
import json, sys
from datetime import datetime, timezone
fmt, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
def iso(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
with open(src) as f, open(dst, "w") as out:
    for line in f:
        r = json.loads(line)
        if fmt == "kong":
            ai = r.get("ai", {})
            usage, meta, body = {}, {}, None
            for v in [ai] + [v for v in ai.values() if isinstance(v, dict)]:
                if "usage" in v:
                    usage, meta = v["usage"], v.get("meta", {})
                    body = v.get("payload", {}).get("request")
                    break
            c = r["consumer"]
            ev = {"ts": iso(r["started_at"]), "request_id": r["request"]["id"],
                  "user_id": c.get("custom_id") or c.get("username") or c["id"],
                  "key_id": r.get("authenticated_entity", {}).get("id", "k"),
                  "ip": r.get("client_ip"), "user_agent": r["request"]["headers"].get("user-agent"),
                  "endpoint": r["request"]["uri"].split("?")[0],
                  "model": meta.get("response_model") or meta.get("request_model"),
                  "status": r["response"]["status"],
                  "prompt_tokens": usage.get("prompt_tokens", usage.get("prompt_token", 0)),
                  "completion_tokens": usage.get("completion_tokens", usage.get("completion_token", 0)),
                  "latency_ms": r["latencies"]["request"]}
            if body:
                ev["prompt"] = body
        elif fmt == "litellm":
            md = r.get("metadata", {})
            ev = {"ts": iso(r["startTime"] * 1000), "request_id": r["id"],
                  "user_id": md.get("user_api_key_user_id") or md.get("user_api_key_team_id") or md.get("user_api_key_hash"),
                  "key_id": md.get("user_api_key_hash") or md.get("user_api_key_alias"),
                  "model": r.get("model_group") or r.get("model"),
                  "status": 200 if r.get("status") == "success" else 500,
                  "prompt_tokens": r.get("prompt_tokens", 0), "completion_tokens": r.get("completion_tokens", 0),
                  "cost_usd": r.get("response_cost"),
                  "latency_ms": round((r["endTime"] - r["startTime"]) * 1000)}
            if r.get("requester_ip_address"):
                ev["ip"] = r["requester_ip_address"]
            m = r.get("messages")
            if m:
                ev["prompt"] = m if isinstance(m, str) else json.dumps(m, separators=(",", ":"))
        else:  # apisix
            ev = {"ts": iso(r["start_time"]), "request_id": "x%d" % len(line),
                  "user_id": r.get("consumer", {}).get("username") or r["request"]["headers"].get("x-tenant-id"),
                  "key_id": "k", "ip": r.get("client_ip"),
                  "user_agent": r["request"]["headers"].get("user-agent"),
                  "endpoint": r["request"]["uri"].split("?")[0],
                  "status": r["response"]["status"], "latency_ms": round(r["latency"])}
            s = r.get("llm_summary", {})
            ev.update({"model": s.get("model"), "prompt_tokens": s.get("prompt_tokens", 0), "completion_tokens": s.get("completion_tokens", 0)})
            m = r.get("llm_request", {}).get("messages")
            if m:
                ev["prompt"] = json.dumps(m, separators=(",", ":"))
        out.write(json.dumps({k: v for k, v in ev.items() if v is not None}, separators=(",", ":")) + "\n")
