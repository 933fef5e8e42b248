"""An HTTP proxy on 127.0.0.1 in front of an S3-compatible server, failing a share of the requests as object
stores do under load: answered with 503 SlowDown, closed without an answer before the request reaches the
store, held unanswered (a connection dropped where no reset reaches the client, which times out), or closed
after the store did it (its answer lost: a write the client must not take as failed twice over).

    python tests/helpers/faulty_proxy.py --target http://127.0.0.1:PORT --port P --fault-rate 0.1 --log FILE

It serves until it is stopped (by pid: a test starts it with Popen and stops it so), and
appends one line per request to FILE: `ok`, `throttled`, `dropped`, `hung` or `lost-answer`, then the method and
path. Faults are drawn from a seeded generator: a run fails about the share asked for. SIGUSR1 begins an outage
(every request dropped) and a second one ends it.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import random
import signal
import socketserver
import threading
import urllib.parse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK uses it

    def log_message(self, *args):  # one line per request goes to the log file instead
        pass

    def _body(self) -> bytes:
        """The request's body, whole: the AWS SDK streams uploads in HTTP chunks."""
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return body
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self):
        body = self._body()
        fault = self.server.draw(self.command)
        self.server.record(fault, self.command, self.path)
        if fault == "throttled":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        if fault == "dropped":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "hung":  # a connection dropped where no reset reaches the client: it times out
            self.close_connection = True
            self.server.stopped.wait(self.server.hang_s)
            return
        status, reason, headers, answer = self.server.forward(self.command, self.path, self.headers, body)
        if fault == "lost-answer":  # the store did it; the client never hears so
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.send_response(status, reason)
        for name, value in headers:  # a HEAD's Content-Length is the object's size: passed on as it is
            if name.lower() not in HOP_BY_HOP and (name.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultyProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, port: int, target: str, fault_rate: float, seed: int, log_path: str, hang_s: float):
        super().__init__(("127.0.0.1", port), Proxy)
        self.target = urllib.parse.urlsplit(target)
        self.fault_rate, self.rng, self.lock = fault_rate, random.Random(seed), threading.Lock()
        self.log = open(log_path, "a", buffering=1)
        self.hang_s, self.stopped = hang_s, threading.Event()

    outage = False

    def handle_error(self, request, client_address):  # a client that gave up on its request: nothing to say
        pass

    def toggle_outage(self, *_) -> None:
        self.outage = not self.outage

    def draw(self, method: str) -> str:
        with self.lock:
            if self.outage:
                return "dropped"
            if self.rng.random() >= self.fault_rate:
                return "ok"
            # answers lost only where the request changes something: a lost GET is a dropped one
            kinds = ["throttled", "dropped", "hung"] + (["lost-answer"] if method in ("PUT", "POST", "DELETE") else [])
            return self.rng.choice(kinds)

    def record(self, fault: str, method: str, path: str) -> None:
        with self.lock:
            self.log.write(f"{fault} {method} {path}\n")

    def forward(self, method, path, headers, body):
        connection = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        try:
            passed = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | {"expect", "content-length"}}
            connection.request(method, path, body=body, headers={**passed, "Content-Length": str(len(body))})
            response = connection.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--hang-s", type=float, default=30.0, help="how long a hung request is held, unanswered")
    args = parser.parse_args()
    proxy = FaultyProxy(args.port, args.target, args.fault_rate, args.seed, args.log, args.hang_s)
    signal.signal(signal.SIGUSR1, proxy.toggle_outage)
    proxy.serve_forever()


if __name__ == "__main__":
    main()
