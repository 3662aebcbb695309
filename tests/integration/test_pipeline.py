"""The whole TEFT engine through the `moesaic` CLI, as an operator runs it:
base build -> experts select -> miner train (two miners) -> artifact verify (good and
tampered) -> merge -> a checkpoint that `from_pretrained` loads with exactly the right weights.
"""

import json
import subprocess
import sys

import pytest
import torch

from moesaic.cli import main


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def base(work):
    out = work / "base"
    assert main(["base", "build", "--preset", "test", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def assignment(work, base):
    out = work / "math.json"
    args = [
        "experts",
        "select",
        "--model",
        str(base),
        "--data",
        "corpus:math",
        "--method",
        "token-ratio",
        "--p",
        "0.3",
        "--tokens",
        "8192",
        "--seq-len",
        "64",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def deltas(work, base, assignment):
    paths = []
    for seed in (0, 1):
        out = work / f"delta-{seed}.safetensors"
        args = [
            "miner",
            "train",
            "--model",
            str(base),
            "--assignment",
            str(assignment),
            "--data",
            "corpus:math",
            "--steps",
            "6",
            "--lr",
            "1e-2",
            "--batch-size",
            "4",
            "--seq-len",
            "64",
            "--max-tokens",
            "20000",
            "--seed",
            str(seed),
            "--out",
            str(out),
            "--quiet",
        ]
        assert main(args) == 0
        paths.append(out)
    return paths


def test_base_is_a_loadable_hf_directory(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    assert model.config.model_type == "qwen3_moe"
    ids = tok("Let x be a prime number.")["input_ids"]
    assert tok.decode(ids) == "Let x be a prime number."
    report = json.loads((base / "moesaic_base.json").read_text())
    assert report["held_out_domain"] == "math" and "routing" in report


def test_base_build_is_deterministic(work, base):
    again = work / "base-again"
    assert main(["base", "build", "--preset", "test", "--out", str(again), "--quiet"]) == 0
    from protocol.identity.hashing import sha256_dir

    assert sha256_dir(again) == sha256_dir(base)


def test_assignment_file(assignment, base):
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment

    a = Assignment.load(assignment)
    assert a.model_hash == sha256_dir(base)
    assert 1 <= a.num_selected() < 2 * 8
    assert a.info["tokens"] >= 8192


def test_verify_accepts_a_good_delta(deltas, assignment, base, capsys):
    assert (
        main(
            [
                "artifact",
                "verify",
                str(deltas[0]),
                "--assignment",
                str(assignment),
                "--base",
                str(base),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("OK ")


def test_verify_rejects_a_tampered_delta(work, deltas, assignment, base, capsys):
    raw = bytearray(deltas[0].read_bytes())
    n = int.from_bytes(raw[:8], "little")
    # Make one float32 value NaN inside the data section.
    raw[8 + n : 8 + n + 4] = bytes([0x00, 0x00, 0xC0, 0x7F])
    bad = work / "tampered.safetensors"
    bad.write_bytes(bytes(raw))
    assert (
        main(["artifact", "verify", str(bad), "--assignment", str(assignment), "--base", str(base)])
        == 1
    )
    assert "REJECTED nonfinite" in capsys.readouterr().err


def test_merge_exports_a_checkpoint_with_exact_weights(work, deltas, assignment, base):
    from transformers import AutoModelForCausalLM

    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.moe.experts import Assignment
    from protocol.moe.model import expert_layout, expert_slices, load_model

    out = work / "merged"
    args = [
        "merge",
        "--base",
        str(base),
        "--assignment",
        str(assignment),
        "--delta",
        str(deltas[0]),
        "--delta",
        str(deltas[1]),
        "--weights",
        "1,3",
        "--method",
        "average",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    ref = load_model(base)
    layout = expert_layout(ref)
    a = Assignment.load(assignment)
    d = [read_delta_untrusted(p, layout=layout, assignment=a, max_bytes=1 << 24)[1] for p in deltas]
    for layer, e in a.pairs():
        got = expert_slices(merged, layout, layer, e)
        want = expert_slices(ref, layout, layer, e)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = layout.expert_key(layer, e, proj)
            # in float32, as the merge computes it (deltas ship in bfloat16 by default)
            expect = want[proj] + (0.25 * d[0][key].float() + 0.75 * d[1][key].float())
            torch.testing.assert_close(got[proj], expect, rtol=0, atol=1e-6)
    # Everything that is not an assigned expert is bit-identical to the base.
    m_state, r_state = merged.state_dict(), ref.state_dict()
    for k in r_state:
        if ".mlp.experts." not in k:
            assert torch.equal(m_state[k], r_state[k]), k


def test_help_does_not_import_torch():
    code = "import sys; from moesaic.cli import main\ntry:\n main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().endswith("False")


def test_bench_train_smoke(base, capsys):
    """scripts/bench_train.py runs and prints one row per method (numbers are not asserted)."""
    from scripts.bench_train import main as bench

    assert (
        bench(
            [
                "--base",
                str(base),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--seq-len",
                "32",
                "--p",
                "0.5",
                "--repeat",
                "1",
            ]
        )
        == 0
    )
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    # One row per method, without and with activation checkpointing.
    assert [r.split("|")[2].strip().split()[0] for r in rows[1:]] == ["full", "lora", "teft"] * 2
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["-"] * 3 + ["checkpointing"] * 3
