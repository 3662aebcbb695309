"""Storage servers as real local processes, for the conformance suite, the 1 GiB test and the bench.

- `running_blob_server(root, ...)`: `moesaic store serve` as a subprocess on 127.0.0.1 and a
  free port, ready when /health answers; stopped by its pid (SIGTERM, then SIGKILL).
- `running_moto()`: moto's S3 server in this process (ThreadedMotoServer), or as a process.
- `running_s3rver(dir, bucket)`: s3rver (npm, node_modules/.bin/s3rver, else $MOESAIC_S3RVER)
  as a node process with its data on disk.

Plain context managers, so scripts/bench_storage.py can reuse them; pytest fixtures below.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from moesaic.devnet.procs import free_port, stop, wait_http  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[2]
ETH_KEY = "0x" + hashlib.sha256(b"moesaic-store-test").hexdigest()
SR25519_KEY = "sr25519://Alice"
OUTSIDER_KEY = "0x" + hashlib.sha256(b"moesaic-store-outsider").hexdigest()
S3RVER_CREDENTIALS = {"access_key": "S3RVER", "secret_key": "S3RVER"}
MOTO_CREDENTIALS = {"access_key": "testing", "secret_key": "testing"}


def store_command() -> list[str]:
    """`python -m moesaic store` once cli.py registers the group, else the module itself."""
    from moesaic import cli

    if any(g.__name__ == "moesaic.commands.store" for g in cli.GROUPS):
        return [sys.executable, "-m", "moesaic", "store"]
    return [sys.executable, "-m", "moesaic.commands.store"]


def identities() -> list[str]:
    from protocol.storage.auth import load_signer

    return [load_signer(ETH_KEY).identity, load_signer(SR25519_KEY).identity]


@dataclass
class BlobServer:
    url: str
    root: Path
    proc: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def running_blob_server(
    root: Path,
    *,
    allow: list[str] | None = None,
    max_bytes: int | None = None,
    options: tuple[str, ...] = (),
) -> Iterator[BlobServer]:
    """The blob server on root; `allow` identities are written to an allow-list file;
    `options` are more `moesaic store serve` flags (quotas, timeouts)."""
    root.mkdir(parents=True, exist_ok=True)
    allow_file = root.parent / f"{root.name}.allow"
    allow_file.write_text("\n".join(identities() if allow is None else allow) + "\n")
    log = root.parent / f"{root.name}.log"
    for attempt in range(2):  # another process may grab the free port in between
        port = free_port()
        cmd = [*store_command(), "serve", "--root", str(root), "--port", str(port)]
        cmd += ["--allow", str(allow_file)]
        if max_bytes is not None:
            cmd += ["--max-bytes", str(max_bytes)]
        cmd += list(options)
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True, cwd=ROOT)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", proc, log)
            break
        except RuntimeError:
            stop(proc)
            if attempt:
                raise
    try:
        yield BlobServer(f"http://127.0.0.1:{port}", root, proc)
    finally:
        stop(proc)


@contextmanager
def running_moto(*, process: bool = False, log_dir: Path | None = None) -> Iterator[str]:
    """moto's S3 on a thread of this process, or (process=True) as its own process, which keeps
    a benchmark's client and server off one GIL; yields the endpoint url."""
    import logging
    import tempfile

    port = free_port()
    if process:
        log = Path(log_dir or tempfile.gettempdir()) / f"moto-{port}.log"
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/", proc, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
        return
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3rver_binary() -> Path | None:
    """node_modules/.bin/s3rver (package.json), else $MOESAIC_S3RVER, else None."""
    local = ROOT / "node_modules" / ".bin" / "s3rver"
    if local.exists():
        return local
    env = os.environ.get("MOESAIC_S3RVER")
    return Path(env) if env and Path(env).exists() else None


@contextmanager
def running_s3rver(directory: Path, bucket: str) -> Iterator[str]:
    """s3rver with `bucket` created, data under directory; yields the endpoint url."""
    binary = s3rver_binary()
    if binary is None:
        raise FileNotFoundError(
            "s3rver not found: npm install (package.json) or set MOESAIC_S3RVER"
        )
    directory.mkdir(parents=True, exist_ok=True)
    log = directory.parent / f"{directory.name}.log"
    port = free_port()
    cmd = [str(binary), "-d", str(directory), "-a", "127.0.0.1", "-p", str(port), "--silent"]
    cmd += ["--configure-bucket", bucket]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def create_bucket(endpoint: str, bucket: str, credentials: dict) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=credentials["access_key"],
        aws_secret_access_key=credentials["secret_key"],
    ).create_bucket(Bucket=bucket)


# -- pytest fixtures ------------------------------------------------------------------------


# Registered under `name=` so test modules can import them without the parameter that uses a
# fixture shadowing the import (ruff F811).
@pytest.fixture(scope="session", name="blob_server")
def blob_server_fixture(tmp_path_factory):
    """One blob server for the session; 32 MiB cap so the cap test needs no big file."""
    with running_blob_server(tmp_path_factory.mktemp("blob") / "root", max_bytes=32 << 20) as srv:
        yield srv


@pytest.fixture(scope="session", name="moto_endpoint")
def moto_endpoint_fixture():
    with running_moto() as endpoint:
        create_bucket(endpoint, "moesaic", MOTO_CREDENTIALS)
        yield endpoint


@pytest.fixture(scope="session", name="s3rver_endpoint")
def s3rver_endpoint_fixture(tmp_path_factory):
    if s3rver_binary() is None:
        # A failure, not a skip: scripts/env.sh installs it, so its absence is a broken setup.
        raise FileNotFoundError("s3rver missing (node_modules/.bin/s3rver): run scripts/env.sh")
    with running_s3rver(tmp_path_factory.mktemp("s3rver") / "data", "moesaic") as endpoint:
        yield endpoint
