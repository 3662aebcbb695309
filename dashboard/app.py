"""The dashboard as a starlette app, served by `moesaic dashboard` with uvicorn on 127.0.0.1.

    app = create_app(Source(rpc="http://127.0.0.1:8545", registry="0x...",
                            dirs=discover("runs/devnet")))
    uvicorn.run(app, host="127.0.0.1", port=8700)

Routes: `/` the page, `/api/state` the same snapshot as JSON (for scripts), `/healthz`.
The chain client is read-only (no key) and made on first use, so the dashboard can start before
the node does; a failed read shows on the page and the next request tries again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from dashboard.page import render
from dashboard.state import RunDirs, discover, merge_dirs, read_curve, snapshot
from protocol.chain.evm import EvmChain
from protocol.storage import open_store


@dataclass
class Source:
    """Where the snapshot comes from: an EVM registry, a store, state directories."""

    rpc: str | None = None
    registry: str | None = None
    store_uri: str | None = None
    dirs: RunDirs = field(default_factory=RunDirs)
    run_dirs: list[str] = field(default_factory=list)  # re-scanned each time: roles appear later
    label: str = ""
    cache_s: float = 1.0  # several tabs or a fast refresh share one chain read per second

    def __post_init__(self):
        self._chain = None
        self._store = None
        self._lock = threading.Lock()
        self._cached: tuple[float, dict] | None = None

    def chain(self):
        if self._chain is None and self.rpc and self.registry:
            # One retry at most: a page waiting out a long backoff looks like a hang.
            self._chain = EvmChain(self.rpc, self.registry, None, retries=1, backoff=0.2)
        return self._chain

    def store(self):
        if self._store is None and self.store_uri:
            self._store = open_store(self.store_uri)
        return self._store

    def snapshot(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.cache_s:
                return self._cached[1]
            dirs = merge_dirs(self.dirs, *(discover(d) for d in self.run_dirs))
            chain_error = None
            try:
                chain = self.chain()
            except Exception as e:  # no node yet, or no contract at the address
                chain, chain_error = None, f"{e.__class__.__name__}: {e}"
            try:
                store = self.store()
            except Exception:
                store = None  # checkpoints then show "in store: -"
            curve = read_curve(self.run_dirs)  # written when a devnet's rounds are done
            snap = snapshot(chain, dirs, store, self.label, curve)
            snap["chain_error"] = snap["chain_error"] or chain_error
            self._cached = (now, snap)
            return snap


def create_app(source: Source, refresh_s: int = 10):
    async def page(request):
        snap = await _in_thread(source.snapshot)
        return HTMLResponse(render(snap, refresh_s=refresh_s))

    async def state(request):
        return JSONResponse(await _in_thread(source.snapshot))

    async def healthz(request):
        return PlainTextResponse("ok\n")

    routes = [Route("/", page), Route("/api/state", state), Route("/healthz", healthz)]
    return Starlette(routes=routes)


async def _in_thread(fn):
    # Chain reads block (web3 over HTTP): keep them off the event loop.
    return await run_in_threadpool(fn)


__all__ = ["Source", "create_app"]
