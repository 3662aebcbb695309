"""CI smoke test of scripts/bench.py --quick: it runs and reports every section with numbers.

No thresholds on the figures themselves (they are wall-clock ratios on a shared machine); the
test checks the report is complete, finite and self-consistent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("communication", "miner", "validator", "merge", "devnet", "compression", "targets")


def _numbers(obj, path=""):
    """Every int/float in a JSON value with its path (bools are flags, not figures)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield path, obj


def test_bench_quick_reports_every_section(tmp_path):
    summary = tmp_path / "devnet.json"
    from moesaic.devnet.summary import time_split

    steps = [("miner", "honest", {"train": 6.0, "upload": 1.0}),
             ("validator", None, {"evaluate": 2.0, "fetch": 1.0})]  # fmt: skip
    summary.write_text(json.dumps({"time_split": time_split(steps)}))
    out = tmp_path / "bench"
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench.py",
            "--quick",
            "--out",
            str(out),
            "--devnet-summary",
            str(summary),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((out / "bench.json").read_text())
    for name in SECTIONS:
        assert res.get(name), f"section {name} missing or empty"
        numbers = list(_numbers(res[name]))
        assert numbers, f"section {name} has no figures"
        bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
        assert not bad, f"non-finite figures in {name}: {bad}"

    # The devnet slot reads the summary it was given: (1 + 1) / (6 + 1 + 2 + 1).
    assert res["devnet"]["devnet_overhead_share"] == pytest.approx(0.2)

    comm = res["communication"]
    for model in ("demo", "qwen3_30b_a3b"):
        c = comm[model]
        assert c["delta_bfloat16_bytes"] < c["delta_float32_bytes"] < 4 * c["full_bf16_bytes"]
        assert c["x_smaller_bfloat16"] == c["full_bf16_bytes"] / c["delta_bfloat16_bytes"]
    assert comm["qwen3_30b_a3b"]["params"] > 30e9  # the real shape, not the reduced sample

    comp = res["compression"]
    schemes = {(r["scheme"], r["mode"]) for r in comp["rows"]}
    assert (comp["recommended"]["scheme"], comp["recommended"]["mode"]) in schemes
    assert any("error feedback" in mode for _, mode in schemes)
    fp32 = next(r for r in comp["rows"] if r["scheme"] == "float32")
    assert fp32["kept"] == 1.0
    assert all(r["wire_bytes"] < fp32["wire_bytes"] for r in comp["rows"] if r is not fp32)
    # The recommendation is a wire encoding (one a miner can ship), with its measured share;
    # low-rank rows also carry the conservative 30B figure at the demo's rank fraction.
    rec = next(r for r in comp["rows"] if r["scheme"] == comp["recommended"]["scheme"])
    assert rec["on_the_wire"]
    low = [r for r in comp["rows"] if r["scheme"].startswith("lowrank")]
    assert low and all(r["x_smaller_q30_same_fraction"] < r["x_smaller_q30"] for r in low)

    # The validator scores the recommended encoding too, holding it as its wire tensors.
    dense, wire = res["validator"]["encodings"]
    assert (dense["encoding"], wire["encoding"]) == ("float32", comp["recommended"]["scheme"])
    assert wire["memory_beyond_model_bytes"] < dense["memory_beyond_model_bytes"]

    assert len(res["targets"]) == 5
    md = (out / "bench.md").read_text()
    for heading in ("Communication", "Miner", "Validator", "Merge", "Devnet", "compression"):
        assert heading in md


def test_devnet_slot_says_not_measured_without_data(tmp_path):
    sys.path.insert(0, str(ROOT))
    from scripts.bench import devnet

    assert devnet(None)["devnet_overhead_share"] is None
    empty = tmp_path / "summary.json"
    empty.write_text(json.dumps({"rounds": []}))
    got = devnet(empty)
    assert got["devnet_overhead_share"] is None and got["note"].startswith("not measured")
    direct = tmp_path / "direct.json"
    direct.write_text(json.dumps({"time_split": {"overhead_share": 0.31}}))
    assert devnet(direct)["devnet_overhead_share"] == 0.31
