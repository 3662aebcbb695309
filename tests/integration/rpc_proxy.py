"""A JSON-RPC proxy for fault tests: real HTTP on 127.0.0.1 between a client and a node.

    with RpcProxy(anvil_url) as proxy:
        proxy.fault("eth_sendRawTransaction", "lose_answer")    # the next one only
        proxy.fault("eth_blockNumber", "502", times=2)
        chain = EvmChain(connect(proxy.url, timeout=2), registry, key)

Each POST is parsed for its JSON-RPC method; the first queued fault for that method (or for
"*") is used up and applied, else the request is forwarded unchanged. Faults:

- "drop":        close the connection without forwarding or answering (the node never saw it)
- "502":         answer HTTP 502 Bad Gateway without forwarding (the node never saw it)
- "delay":       sleep `delay` s, then forward and answer (a client timeout may come first)
- "lose_answer": forward, let the node act on it, then close the connection without
                 answering: for eth_sendRawTransaction the transaction is in, the client
                 does not know (the dangerous case)
- "stale":       answer {"result": null} without forwarding, as a lagging backend behind a
                 load balancer does for a transaction it has not seen yet (receipt or lookup)
- "garbage":     answer HTTP 200 with a body that is not JSON (a broken or hostile endpoint)
- "bad_result":  answer a well-formed JSON-RPC reply whose result has the wrong shape
- "rpc_error":   answer a JSON-RPC error object (-32603 internal error) without forwarding

`proxy.seen` lists (method, fault or None) for every request, `proxy.forwarded(method)`
counts those the node actually received, and `proxy.raw_sent` holds the params of every
eth_sendRawTransaction in arrival order. Batches (JSON arrays) are forwarded as they are.
The server runs in a daemon thread of the test process and is stopped by `close()`.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("drop", "502", "delay", "lose_answer", "stale", "garbage", "bad_result", "rpc_error")
# Faults after which the node has acted on the request ("delay": unless the client's retry
# was answered first, which is what the tests check for).
_REACHED_NODE = (None, "delay", "lose_answer")
# Answers made up without forwarding: raw bytes, or the fields of a JSON-RPC reply.
_FORGED = {
    "garbage": b"<html>\x00\xff not json",
    "bad_result": {"result": {"unexpected": ["shape"]}},
    "rpc_error": {"error": {"code": -32603, "message": "internal error"}},
}


@dataclass
class _Fault:
    method: str
    kind: str
    times: int
    delay: float


class RpcProxy:
    """Forwards JSON-RPC POSTs to `upstream`, applying queued faults (module doc)."""

    def __init__(self, upstream: str, port: int = 0, timeout: float = 30.0):
        self.upstream, self.timeout = upstream, timeout
        self.seen: list[tuple[str, str | None]] = []
        self.raw_sent: list[str] = []
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real node: drops hit pooled sockets

            def do_POST(self):
                proxy._handle(self)

            def log_message(self, *args):  # the test output stays readable
                pass

        # port 0: the OS picks a free one, so two test processes cannot race for it.
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fault(self, method: str, kind: str, *, times: int = 1, delay: float = 0.0) -> None:
        """Apply `kind` to the next `times` requests for `method` ("*": any method)."""
        if kind not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {kind!r}")
        with self._lock:
            self._faults.append(_Fault(method, kind, times, delay))

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[tuple[str, str, int]]:
        """Faults queued but not yet used up: (method, kind, times left)."""
        with self._lock:
            return [(f.method, f.kind, f.times) for f in self._faults]

    def forwarded(self, method: str) -> int:
        """How many requests for `method` reached the node."""
        with self._lock:
            return sum(1 for m, f in self.seen if m == method and f in _REACHED_NODE)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RpcProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the server side

    def _take(self, method: str) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.method in (method, "*"):
                    f.times -= 1
                    if f.times <= 0:
                        self._faults.remove(f)
                    return f
            return None

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        method = doc.get("method", "?") if isinstance(doc, dict) else "?"
        fault = self._take(method)
        with self._lock:
            self.seen.append((method, fault.kind if fault else None))
            if method == "eth_sendRawTransaction":
                self.raw_sent.append(doc["params"][0])
        if fault and fault.kind == "drop":
            req.close_connection = True
            return  # nothing written: the client sees the connection closed under it
        if fault and fault.kind == "502":
            self._answer(req, 502, b"bad gateway", "text/plain")
            return
        if fault and fault.kind == "stale":
            null = {"jsonrpc": "2.0", "id": doc.get("id"), "result": None}
            self._answer(req, 200, json.dumps(null).encode(), "application/json")
            return
        if fault and fault.kind in _FORGED:
            forged = _FORGED[fault.kind]
            body = (
                forged
                if isinstance(forged, bytes)
                else json.dumps({"jsonrpc": "2.0", "id": doc.get("id"), **forged}).encode()
            )
            self._answer(req, 200, body, "application/json")
            return
        if fault and fault.kind == "delay":
            time.sleep(fault.delay)
        status, answer = self._forward(body)
        if fault and fault.kind == "lose_answer":
            req.close_connection = True
            return  # the node acted on it; its answer goes nowhere
        self._answer(req, status, answer, "application/json")

    def _forward(self, body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.upstream, body, {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:  # the node's own error status passes through
            return e.code, e.read()
        except OSError as e:  # the node is down: what a real gateway says
            return 502, str(e).encode()

    @staticmethod
    def _answer(req: BaseHTTPRequestHandler, status: int, body: bytes, kind: str) -> None:
        try:
            req.send_response(status)
            req.send_header("Content-Type", kind)
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
        except OSError:  # the client gave up (timed out) while we were delayed
            req.close_connection = True
