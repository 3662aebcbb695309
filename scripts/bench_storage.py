"""Put and get throughput of every storage backend on this machine, as a markdown table.

    python scripts/bench_storage.py                      # 256 MiB, all backends
    python scripts/bench_storage.py --size-mib 1024 --backends file,http

Each backend runs on 127.0.0.1 with its data on local disk: `file` (a directory), `http` (the
blob server, `moesaic store serve`, as a subprocess), `s3-moto` (moto's server as a process)
and `s3-s3rver` (node, skipped if not installed). put = hash + upload (+ the server's hash
and fsync); get = download + hash + fsync + rename: the times a miner and a validator see.
The file is random bytes written in 1 MiB blocks; nothing holds it in memory. The server
launchers are shared with the tests (tests/integration/storage_fixtures.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))  # the shared server launchers
sys.path.insert(0, str(ROOT))

BACKENDS = ("file", "http", "s3-moto", "s3-s3rver")
MIB = 1 << 20


def write_random(path: Path, size: int) -> None:
    """size bytes, every 1 MiB block distinct, written block by block."""
    base = os.urandom(MIB)
    with path.open("wb") as f:
        for i in range(0, size, MIB):
            block = i.to_bytes(8, "little") + base[8:]
            f.write(block[: min(MIB, size - i)])
        os.fsync(f.fileno())  # its writeback must not land inside the first backend's timing


def open_backend(name: str, work: Path, stack: ExitStack):
    """A store for `name`, with its server started on `stack`; None if unavailable."""
    import storage_fixtures as fx

    from protocol.storage import open_store
    from protocol.storage.auth import load_signer

    if name == "file":
        return open_store(str(work / "file-store"))
    if name == "http":
        srv = stack.enter_context(fx.running_blob_server(work / "blob-root"))
        return open_store(srv.url, signer=load_signer(fx.ETH_KEY))
    if name == "s3-moto":
        endpoint = stack.enter_context(fx.running_moto(process=True, log_dir=work))
        fx.create_bucket(endpoint, "bench", fx.MOTO_CREDENTIALS)
        return open_store(f"s3://bench/b?endpoint={endpoint}", **fx.MOTO_CREDENTIALS)
    if name == "s3-s3rver":
        if fx.s3rver_binary() is None:
            return None
        endpoint = stack.enter_context(fx.running_s3rver(work / "s3rver", "bench"))
        return open_store(f"s3://bench/b?endpoint={endpoint}", **fx.S3RVER_CREDENTIALS)
    raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


def bench_one(name: str, src: Path, size: int, work: Path) -> tuple[float, float] | None:
    """(put MiB/s, get MiB/s) for one backend, or None if it is not installed."""
    with ExitStack() as stack:
        store = open_backend(name, work, stack)
        if store is None:
            return None
        t0 = time.perf_counter()
        ref = store.put(src)
        t1 = time.perf_counter()
        dest = work / f"{name}.out"
        store.get(ref, dest, expected_sha256=ref.sha256, max_bytes=size)
        t2 = time.perf_counter()
        dest.unlink()
        return size / MIB / (t1 - t0), size / MIB / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--workdir", help="where the file and stores go (default: a temp dir)")
    args = parser.parse_args(argv)
    from protocol.storage.transfer import hash_file

    size = args.size_mib * MIB
    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.workdir))
    try:
        src = work / "src.bin"
        write_random(src, size)
        t0 = time.perf_counter()
        hash_file(src)
        sha_rate = size / MIB / (time.perf_counter() - t0)
        print(f"| backend ({args.size_mib} MiB) | put MiB/s | get MiB/s |")
        print("|---|---:|---:|")
        print(f"| sha256 of the file alone | {sha_rate:.0f} | |")
        for name in args.backends.split(","):
            rates = bench_one(name.strip(), src, size, work)
            cells = "not installed | " if rates is None else f"{rates[0]:.0f} | {rates[1]:.0f}"
            print(f"| {name} | {cells} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
