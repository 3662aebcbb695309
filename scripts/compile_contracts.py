"""Compile contracts/*.sol with the pinned solc-js into committed JSON artifacts.

    python scripts/compile_contracts.py            # writes contracts/build/<Contract>.json
    python scripts/compile_contracts.py --check    # exit 1 if the committed artifacts differ

Solidity compiles offline here only through solc-js (npm `solc`, pinned in package.json); the
Python code reads the committed artifact, so neither node nor solc is needed at run time. The
output is deterministic (fixed settings, sorted keys, source paths relative to the repo), and
tests/unit/test_contracts_build.py recompiles and fails if the committed artifact is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLC_JS = ROOT / "node_modules" / "solc" / "solc.js"
SOLC_VERSION = "0.8.37"
# paris: no PUSH0/MCOPY/transient storage, so the bytecode runs on EVM chains that lag behind
# mainnet forks (Bittensor EVM and other Frontier-based chains, older L2s).
SETTINGS = {
    "evmVersion": "paris",
    "optimizer": {"enabled": True, "runs": 200},
    "metadata": {"bytecodeHash": "ipfs"},
    "outputSelection": {
        "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]},
    },
}


def sources(root: Path = ROOT) -> dict[str, str]:
    """Repo-relative path -> source text of every contracts/*.sol, sorted by path."""
    files = sorted((root / "contracts").glob("*.sol"))
    if not files:
        raise FileNotFoundError(f"no .sol files in {root / 'contracts'}")
    return {f.relative_to(root).as_posix(): f.read_text() for f in files}


def run_solc(srcs: dict[str, str]) -> dict:
    """solc-js standard-json output for `srcs`; raises on compiler errors or a version skew."""
    version = _node([str(SOLC_JS), "--version"], "").strip()
    if not version.startswith(SOLC_VERSION + "+"):
        raise RuntimeError(f"solc-js is {version!r}, expected {SOLC_VERSION}: run `npm install`")
    request = {
        "language": "Solidity",
        "sources": {p: {"content": s} for p, s in srcs.items()},
        "settings": SETTINGS,
    }
    stdout = _node([str(SOLC_JS), "--standard-json"], json.dumps(request))
    # solc-js prints diagnostic lines starting with ">>>" before the JSON document.
    doc = "\n".join(line for line in stdout.splitlines() if not line.startswith(">>>"))
    output = json.loads(doc)
    errors = [e for e in output.get("errors", []) if e["severity"] == "error"]
    for e in output.get("errors", []):
        print(e["formattedMessage"], file=sys.stderr)
    if errors:
        raise RuntimeError(f"solc reported {len(errors)} error(s)")
    return output


def _node(args: list[str], stdin: str) -> str:
    if not SOLC_JS.exists():
        raise FileNotFoundError(f"{SOLC_JS} missing: run `npm install` in {ROOT}")
    # stdout goes to a file, not a pipe: solc.js calls process.exit(), which cuts piped output
    # at 64 KiB, while writes to a file are synchronous in node.
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(
            ["node", *args],
            input=stdin,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"node {args[-1]} failed: {done.stderr.strip()}")
        out.seek(0)
        return out.read()


def artifacts(srcs: dict[str, str], output: dict) -> dict[str, str]:
    """Contract name -> artifact JSON text (sorted keys, trailing newline)."""
    out = {}
    for path, contracts in sorted(output["contracts"].items()):
        sha = hashlib.sha256(srcs[path].encode()).hexdigest()
        for name, c in sorted(contracts.items()):
            doc = {
                "contractName": name,
                "source": path,
                "sourceSha256": sha,
                "compiler": SOLC_VERSION,
                "settings": {k: v for k, v in SETTINGS.items() if k != "outputSelection"},
                "abi": c["abi"],
                "bytecode": "0x" + c["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + c["evm"]["deployedBytecode"]["object"],
            }
            out[name] = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    return out


def compile_all(out_dir: Path) -> list[Path]:
    """Compile every contract and write `<out_dir>/<Contract>.json`; returns the paths."""
    srcs = sources()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in artifacts(srcs, run_solc(srcs)).items():
        path = out_dir / f"{name}.json"
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "contracts" / "build")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args(argv)
    if not args.check:
        for path in compile_all(args.out):
            print(path)
        return 0
    srcs = sources()
    stale = [
        name
        for name, text in artifacts(srcs, run_solc(srcs)).items()
        if not (args.out / f"{name}.json").exists()
        or (args.out / f"{name}.json").read_text() != text
    ]
    for name in stale:
        print(f"stale: {args.out / name}.json (run scripts/compile_contracts.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
