#!/usr/bin/env python3
"""A real SMTP server for keywatch's e-mail delivery tests (aiosmtpd).

    smtp_receiver.py --port P --out FILE [--fail-first N] [--reject]
                     [--user U --password P]

Every accepted message is appended to FILE as one JSON line:
{"mail_from", "rcpt_tos", "received_at", "subject", "message_id", "from",
"to", "text", "html", "content_type", "raw_size", "attempt", "auth_user"},
parsed with the standard `email` package (policy=default); `text` and
`html` are the decoded text/plain and text/html parts (null when absent),
`attempt` counts the DATA commands received so far (1-based).

--fail-first N  answer `451 4.3.0 try again later` to the first N DATA
                commands (a transient failure the sender should retry)
--reject        answer `550 5.7.1 rejected` to every DATA (permanent)
--user/--password  require AUTH PLAIN or LOGIN, without TLS

Runs on 127.0.0.1 until SIGTERM.
"""

import argparse
import email
import email.policy
import json
import logging
import signal
import sys
import threading
import time
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, out, fail_first, reject):
        self.out = open(out, "a", encoding="utf-8")
        self.fail_first = fail_first
        self.reject = reject
        self.attempts = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.attempts += 1
            attempt = self.attempts
        if self.reject:
            sys.stderr.write(f"DATA #{attempt} rejected (550)\n")
            return "550 5.7.1 rejected"
        if attempt <= self.fail_first:
            sys.stderr.write(f"DATA #{attempt} deferred (451)\n")
            return "451 4.3.0 try again later"
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", errors="surrogateescape")
        msg = email.message_from_bytes(raw, policy=email.policy.default)

        def part(kind):
            p = msg.get_body(preferencelist=(kind,))
            if p is None:
                return None
            try:
                return p.get_content()
            except Exception as e:  # undecodable: keep the error visible
                return f"<undecodable {kind} part: {e}>"

        def header(name):
            v = msg.get(name)
            return None if v is None else str(v)

        auth = getattr(session, "auth_data", None)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "received_at": time.time(),
            "subject": header("Subject"),
            "message_id": header("Message-ID"),
            "from": header("From"),
            "to": header("To"),
            "text": part("plain"),
            "html": part("html"),
            "content_type": msg.get_content_type(),
            "raw_size": len(raw),
            "attempt": attempt,
            "auth_user": auth.login.decode() if isinstance(auth, LoginPassword) else None,
        }
        with self.lock:
            self.out.write(json.dumps(record, sort_keys=True) + "\n")
            self.out.flush()
        return "250 OK: queued"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True, help="JSON-lines file of accepted messages")
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--reject", action="store_true")
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()
    if (args.user is None) != (args.password is None):
        ap.error("--user and --password go together")

    # Plain-text AUTH is what these tests want: don't warn on every connection.
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
    logging.getLogger("mail.log").setLevel(logging.ERROR)

    handler = Handler(args.out, args.fail_first, args.reject)
    kwargs = {}
    if args.user is not None:
        user, password = args.user.encode(), args.password.encode()

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                mechanism in ("PLAIN", "LOGIN")
                and isinstance(auth_data, LoginPassword)
                and auth_data.login == user
                and auth_data.password == password
            )
            return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

        kwargs = {
            "authenticator": authenticator,
            "auth_required": True,
            "auth_require_tls": False,
        }
    controller = Controller(
        handler, hostname="127.0.0.1", port=args.port, server_hostname="keywatch-test-smtp", **kwargs
    )

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    controller.start()
    sys.stderr.write(f"smtp receiver listening on 127.0.0.1:{args.port}\n")
    sys.stderr.flush()
    while not done.wait(0.5):
        pass
    controller.stop()
    handler.out.close()
    sys.stderr.write("smtp receiver stopped\n")


if __name__ == "__main__":
    main()
