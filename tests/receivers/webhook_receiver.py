#!/usr/bin/env python3
"""A real HTTP receiver for keywatch's delivery tests.

Receives signed webhooks (`/hook/<name>`) and Slack incoming-webhook posts
(`/slack/<name>`), records every request (one JSON line in the log file and
in memory), verifies webhook signatures with the `standardwebhooks` package
(independent of keywatch's Rust code) and validates Slack Block Kit
payloads. How it answers is chosen per name through `POST /_mode/<name>`.

    webhook_receiver.py --port P --log FILE [--secret whsec_...]...

Secrets may also come from the environment variable
`WEBHOOK_RECEIVER_SECRETS` (whitespace-separated), which keeps them off `ps`.

Control endpoints (not logged):
    GET  /_health           200 "ok"
    GET  /_log              every record, as a JSON list (includes the
                            records of earlier runs found in the log file)
    POST /_mode/<name>      {"mode": "ok" | "status" | "redirect" | "slow" |
                            "hang" | "drop", ...params}
    POST /_secrets          {"secrets": ["whsec_...", ...]} replaces them

Modes (default `ok`):
    ok        200 (Slack: body `ok`); an invalid Slack payload gets 400
              `invalid_blocks`, as Slack answers
    status    {"status": 500, "times": N, "retry_after": "2", "body": "..."}:
              that status for the next N requests to the name (N absent:
              forever), then `ok`
    redirect  {"status": 302, "location": "..."}: a redirect, by default to
              `/hook/<name>-redirected` (a sender must not follow it; if it
              does, that request is logged under the other path)
    slow      {"seconds": S}: sleep S, then as `ok`
    hang      {"seconds": S (default 3600)}: record the request, never
              answer (the connection is closed without a response after S
              or at shutdown)
    drop      close the connection without any response
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks

RECORDED_HEADERS = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "user-agent",
)

SLACK_BLOCK_TYPES = {"header", "section", "divider", "context", "actions"}


class State:
    """Everything the handler threads share, behind one lock."""

    def __init__(self, log_path, secrets):
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.log_path = log_path
        self.secrets = list(secrets)
        self.modes = {}
        self.records = []
        # Records of an earlier run on the same log file (restart tests).
        if os.path.exists(log_path):
            with open(log_path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            self.records.append(json.loads(line))
                        except ValueError:
                            pass
        self.log = open(log_path, "a", encoding="utf-8")

    def append(self, record):
        with self.lock:
            self.records.append(record)
            self.log.write(json.dumps(record, sort_keys=True) + "\n")
            self.log.flush()

    def take_mode(self, name):
        """The mode to use for one request to `name` (consumes a `times`)."""
        with self.lock:
            mode = self.modes.get(name)
            if mode is None:
                return {"mode": "ok"}
            mode = dict(mode)
            if mode.get("mode") == "status" and mode.get("times") is not None:
                left = int(mode["times"])
                if left <= 0:
                    self.modes.pop(name, None)
                    return {"mode": "ok"}
                left -= 1
                if left == 0:
                    self.modes.pop(name, None)
                else:
                    self.modes[name] = dict(mode, times=left)
            return mode


def verify(secrets, body, headers):
    """(verified, error) for a webhook request, trying each secret."""
    if not secrets:
        return False, "no secret configured"
    errors = []
    for secret in secrets:
        try:
            standardwebhooks.Webhook(secret).verify(body, headers, json_parse=False)
            return True, None
        except Exception as e:  # malformed headers raise ValueError etc. too
            errors.append(f"{type(e).__name__}: {e}")
    return False, "; ".join(errors)


def _text_object(obj, where, limit, kinds, errors):
    if not isinstance(obj, dict):
        errors.append(f"{where}: not a text object")
        return
    if obj.get("type") not in kinds:
        errors.append(f"{where}.type: {obj.get('type')!r} not one of {sorted(kinds)}")
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        errors.append(f"{where}.text: missing or empty")
    elif len(text) > limit:
        errors.append(f"{where}.text: {len(text)} chars > {limit}")


def validate_slack(payload):
    """The list of problems Slack would reject in an incoming-webhook payload."""
    errors = []
    if not isinstance(payload, dict):
        return ["payload is not a JSON object"]
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip():
        errors.append("text: missing or empty (the notification fallback)")
    blocks = payload.get("blocks")
    if not isinstance(blocks, list) or not (1 <= len(blocks) <= 50):
        errors.append("blocks: must be a list of 1..50 blocks")
        return errors
    both = {"plain_text", "mrkdwn"}
    for i, b in enumerate(blocks):
        where = f"blocks[{i}]"
        if not isinstance(b, dict):
            errors.append(f"{where}: not an object")
            continue
        kind = b.get("type")
        if kind not in SLACK_BLOCK_TYPES:
            errors.append(f"{where}.type: {kind!r} not one of {sorted(SLACK_BLOCK_TYPES)}")
            continue
        if "block_id" in b and (not isinstance(b["block_id"], str) or len(b["block_id"]) > 255):
            errors.append(f"{where}.block_id: not a string of <= 255 chars")
        if kind == "header":
            _text_object(b.get("text"), f"{where}.text", 150, {"plain_text"}, errors)
        elif kind == "section":
            if "text" not in b and "fields" not in b:
                errors.append(f"{where}: a section needs text or fields")
            if "text" in b:
                _text_object(b["text"], f"{where}.text", 3000, both, errors)
            if "fields" in b:
                fields = b["fields"]
                if not isinstance(fields, list) or not (1 <= len(fields) <= 10):
                    errors.append(f"{where}.fields: must be a list of 1..10")
                else:
                    for j, f in enumerate(fields):
                        _text_object(f, f"{where}.fields[{j}]", 2000, both, errors)
        elif kind == "context":
            elements = b.get("elements")
            if not isinstance(elements, list) or not (1 <= len(elements) <= 10):
                errors.append(f"{where}.elements: must be a list of 1..10")
            else:
                for j, e in enumerate(elements):
                    ew = f"{where}.elements[{j}]"
                    if isinstance(e, dict) and e.get("type") == "image":
                        if not e.get("image_url") or not e.get("alt_text"):
                            errors.append(f"{ew}: an image needs image_url and alt_text")
                    else:
                        _text_object(e, ew, 3000, both, errors)
        elif kind == "actions":
            elements = b.get("elements")
            if not isinstance(elements, list) or not (1 <= len(elements) <= 25):
                errors.append(f"{where}.elements: must be a list of 1..25")
            else:
                for j, e in enumerate(elements):
                    ew = f"{where}.elements[{j}]"
                    if not isinstance(e, dict) or e.get("type") != "button":
                        errors.append(f"{ew}: only buttons are expected")
                        continue
                    _text_object(e.get("text"), f"{ew}.text", 75, {"plain_text"}, errors)
                    url = e.get("url")
                    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                        errors.append(f"{ew}.url: missing or not an http(s) URL")
                    elif len(url) > 3000:
                        errors.append(f"{ew}.url: longer than 3000 chars")
    return errors


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keywatch-test-receiver/1"
    state: State = None  # set in main()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), format % args))

    # ---- plumbing -------------------------------------------------------

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def answer(self, status, body=b"", content_type="text/plain", headers=()):
        if isinstance(body, str):
            body = body.encode()
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def answer_json(self, status, value):
        self.answer(status, json.dumps(value), "application/json")

    def handle_any(self):
        body = self.read_body()
        path = self.path.split("?", 1)[0]
        if path.startswith("/_"):
            return self.control(path, body)
        for prefix, kind in (("/hook/", "hook"), ("/slack/", "slack")):
            if path.startswith(prefix) and len(path) > len(prefix):
                return self.delivery(kind, path, path[len(prefix):], body)
        self.answer(404, "not found")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

    # ---- control --------------------------------------------------------

    def control(self, path, body):
        st = self.state
        if path == "/_health":
            return self.answer(200, "ok")
        if path == "/_log" and self.command == "GET":
            with st.lock:
                records = list(st.records)
            return self.answer_json(200, records)
        if path.startswith("/_mode/") and self.command == "POST":
            name = path[len("/_mode/"):]
            try:
                mode = json.loads(body or b"{}")
                assert isinstance(mode, dict)
            except Exception:
                return self.answer(400, "the mode must be a JSON object")
            if mode.get("mode", "ok") not in ("ok", "status", "redirect", "slow", "hang", "drop"):
                return self.answer(400, f"unknown mode {mode.get('mode')!r}")
            with st.lock:
                if mode.get("mode", "ok") == "ok":
                    st.modes.pop(name, None)
                else:
                    st.modes[name] = mode
            return self.answer_json(200, {"name": name, "mode": mode})
        if path == "/_secrets" and self.command == "POST":
            try:
                secrets = json.loads(body)["secrets"]
                assert all(isinstance(s, str) for s in secrets)
            except Exception:
                return self.answer(400, 'expected {"secrets": [...]}')
            with st.lock:
                st.secrets = list(secrets)
            return self.answer_json(200, {"secrets": len(secrets)})
        self.answer(404, "unknown control endpoint")

    # ---- deliveries -----------------------------------------------------

    def delivery(self, kind, path, name, body):
        st = self.state
        received_at = time.time()
        text = body.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        headers = {h: self.headers.get(h) for h in RECORDED_HEADERS}
        record = {
            "path": path,
            "name": name,
            "kind": kind,
            "method": self.command,
            "received_at": received_at,
            "headers": headers,
            "body": parsed,
            "verified": None,
            "verify_error": None,
        }
        if kind == "hook":
            with st.lock:
                secrets = list(st.secrets)
            sig_headers = {h: v for h, v in headers.items() if v is not None}
            record["verified"], record["verify_error"] = verify(secrets, body, sig_headers)
        slack_errors = []
        if kind == "slack":
            slack_errors = validate_slack(parsed)
            record["slack_valid"] = not slack_errors
            record["slack_errors"] = slack_errors

        mode = st.take_mode(name)
        m = mode.get("mode", "ok")
        record["mode"] = m
        resp_headers = []
        if m == "status":
            status = int(mode.get("status", 500))
            if mode.get("retry_after") is not None:
                resp_headers.append(("Retry-After", str(mode["retry_after"])))
            default = "rate_limited" if status == 429 else "error"
            resp_body = mode.get("body", default if kind == "slack" else json.dumps({"error": default}))
        elif m == "redirect":
            status = int(mode.get("status", 302))
            resp_headers.append(("Location", mode.get("location", f"/{kind}/{name}-redirected")))
            resp_body = ""
        elif m in ("hang", "drop"):
            status = None
            resp_body = ""
        elif slack_errors:  # ok and slow
            status, resp_body = 400, "invalid_blocks"
        else:
            status, resp_body = 200, ("ok" if kind == "slack" else "")
        record["answer"] = status
        st.append(record)

        if m == "hang":
            st.stop.wait(float(mode.get("seconds", 3600)))
            self.close_connection = True
            return
        if m == "drop":
            self.close_connection = True
            return
        if m == "slow":
            st.stop.wait(float(mode.get("seconds", 1)))
        try:
            self.answer(status, resp_body, headers=resp_headers)
        except OSError:
            pass  # the sender gave up (timeout) while we were slow


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--log", required=True, help="JSON-lines file of every request")
    ap.add_argument("--secret", action="append", default=[], help="whsec_... (repeatable)")
    args = ap.parse_args()

    secrets = list(args.secret) + os.environ.get("WEBHOOK_RECEIVER_SECRETS", "").split()
    state = State(args.log, secrets)
    Handler.state = state
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True

    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    sys.stderr.write(f"webhook receiver listening on {args.host}:{args.port}\n")
    sys.stderr.flush()
    while not done.wait(0.5):
        pass
    state.stop.set()  # releases hanging and slow requests
    server.shutdown()
    server.server_close()
    with state.lock:
        state.log.close()
    sys.stderr.write("webhook receiver stopped\n")


if __name__ == "__main__":
    main()
