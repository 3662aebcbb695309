"""Measure copy detection by function (docs/copies.md): raw-delta cosine against function
fingerprint cosine for every kind of copy, and the closest pair of independent honest miners.

    python scripts/copies_table.py [--work runs/copies] [--honest 6] [--probes 64]

Builds the `test` preset base and its math assignment in --work (once), trains --honest honest
deltas as the devnet's miners do (configs/devnet-test.toml [miner.train] before issue 16: 16 steps, lr 1e-2, seeds
0..n-1, shipped in bfloat16), makes copies of honest miner 0's delta, and prints a markdown
table: the raw sketch cosine (protocol.artifact.sketch) and the function fingerprint cosine
(protocol.artifact.fingerprint) with Gaussian probes, and, for comparison, with probes taken
from real hidden states (the base's MoE inputs on prose). Also the fingerprint's time per
delta here and per expert at the Qwen3-30B-A3B shape.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from miner.teft import train_experts
from moesaic.cli import main as cli
from protocol.artifact.delta import apply_delta, wire_roundtrip
from protocol.artifact.fingerprint import (
    equivalent_delta,
    expert_forward,
    fingerprint,
)
from protocol.artifact.sketch import cosines, sketch
from protocol.moe.data import batch_stream, load_blocks
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, expert_slices, load_model
from protocol.moe.train import TrainConfig
from protocol.settings import TrainSettings

SECRET = b"copies-table-secret"
DEVNET = TrainSettings(steps=16, lr=1e-2, batch_size=4, seq_len=64, max_tokens=50_000)
SHIPPED = "bfloat16"  # the devnet's wire encoding: every shipped delta goes through it


def base_views(model, layout) -> dict[str, torch.Tensor]:
    out = {}
    for layer in layout.moe_layers:
        for e in range(layout.num_experts):
            for proj, view in expert_slices(model, layout, layer, e).items():
                out[layout.expert_key(layer, e, proj)] = view
    return out


def train(model, layout, assignment, blocks, seed: int, steps: int) -> dict:
    cfg = TrainConfig.for_job(TrainSettings(**{**DEVNET.__dict__, "steps": steps}), bf16=False)
    torch.manual_seed(seed)
    batches = batch_stream(blocks, DEVNET.batch_size, seed)
    delta, _ = train_experts(model, layout, assignment, batches, cfg, progress=False)
    return {k: v.float() for k, v in delta.items()}


def hidden_probes(model, layout, tokenizer, n: int) -> dict[int, torch.Tensor]:
    """n real MoE inputs per layer: the base's hidden states entering each MoE block on prose."""
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        model.get_submodule(f"{layout.prefix}.{layer}.mlp").register_forward_pre_hook(
            lambda _m, args, layer=layer: seen.__setitem__(
                layer, args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for layer in layout.moe_layers
    ]
    blocks = load_blocks("corpus:prose", "train", tokenizer, 64, 4096)
    with torch.no_grad():
        model(blocks[:8])
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    return {
        layer: x[torch.randperm(x.shape[0], generator=g)[:n]].clone() for layer, x in seen.items()
    }


def hidden_fingerprint(delta, base, xs: dict[int, torch.Tensor], layout) -> torch.Tensor:
    """The fingerprint with real hidden states as probes (exact, no sketch: small model)."""
    parts = []
    for key in sorted(k for k in delta if k.endswith("gate_proj.weight")):
        stem = key[: -len("gate_proj.weight")]
        layer = int(stem.split(".")[-5])
        w0 = [base[stem + p + ".weight"].float() for p in ("gate_proj", "up_proj", "down_proj")]
        w1 = [
            w + delta[stem + p + ".weight"].float()
            for w, p in zip(w0, ("gate_proj", "up_proj", "down_proj"), strict=True)
        ]
        parts.append((expert_forward(*w1, xs[layer]) - expert_forward(*w0, xs[layer])).reshape(-1))
    return torch.cat(parts)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def big_expert_seconds(n: int) -> float:
    """Fingerprint time of one expert at the Qwen3-30B-A3B shape (H 2048, I 768) on this CPU."""
    h, i = 2048, 768
    g = torch.Generator().manual_seed(0)
    keys = {
        p: f"model.layers.0.mlp.experts.0.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")
    }
    shapes = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    base = {keys[p]: torch.randn(shapes[p], generator=g) * 0.02 for p in keys}
    delta = {keys[p]: torch.randn(shapes[p], generator=g) * 1e-3 for p in keys}
    fingerprint(delta, base, secret=SECRET, n=n)
    t = time.perf_counter()
    for _ in range(3):
        fingerprint(delta, base, secret=SECRET, n=n)
    return (time.perf_counter() - t) / 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/copies")
    ap.add_argument("--honest", type=int, default=6)
    ap.add_argument("--probes", type=int, default=64)
    args = ap.parse_args(argv)
    work = Path(args.work)
    base_dir, assignment_path = work / "base", work / "math.json"
    if not (base_dir / "config.json").exists():
        assert cli(["base", "build", "--preset", "test", "--out", str(base_dir), "--quiet"]) == 0
    if not assignment_path.exists():
        sel = ["experts", "select", "--model", str(base_dir), "--data", "corpus:math"]
        sel += ["--method", "token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
        assert cli([*sel, "--out", str(assignment_path), "--quiet"]) == 0

    model = load_model(base_dir)
    layout, assignment = expert_layout(model), Assignment.load(assignment_path)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    blocks = load_blocks("corpus:math", "train", tokenizer, DEVNET.seq_len, DEVNET.max_tokens)
    base = base_views(model, layout)
    ship = lambda d: wire_roundtrip(d, SHIPPED)  # noqa: E731 (one-line alias)

    honest = [
        ship(train(model, layout, assignment, blocks, s, DEVNET.steps)) for s in range(args.honest)
    ]
    original = honest[0]
    g = torch.Generator().manual_seed(1)
    noise = torch.Generator().manual_seed(2)
    with apply_delta(model, layout, original):  # the copier trains on from the original
        further = train(model, layout, assignment, blocks, 100, 4)
    copies = {
        "exact": original,
        "permuted": equivalent_delta(original, base, g, flip=False, rescale=False),
        "sign-flipped": equivalent_delta(original, base, g, permute=False, rescale=False),
        "rescaled (up x c, down / c, c in [0.5, 2])": equivalent_delta(
            original, base, g, permute=False, flip=False
        ),
        "permuted + flipped + rescaled": equivalent_delta(original, base, g),
        "noised (20 % of each tensor's std)": {
            k: v + 0.2 * v.std() * torch.randn(v.shape, generator=noise)
            for k, v in original.items()
        },
        "noised (50 %)": {
            k: v + 0.5 * v.std() * torch.randn(v.shape, generator=noise)
            for k, v in original.items()
        },
        "low-rank refactored (lowrank8)": wire_roundtrip(original, "lowrank8"),
        "low-rank refactored (lowrank4)": wire_roundtrip(original, "lowrank4"),
        "fine-tuned 4 steps further": {k: original[k] + further[k] for k in original},
        "permuted + flipped + rescaled, then fine-tuned": {
            k: v + further[k] for k, v in equivalent_delta(original, base, g).items()
        },
    }
    xs = hidden_probes(model, layout, tokenizer, args.probes)

    def measure(a, b) -> tuple[float, float, float]:
        raw = cosines({"a": sketch(a, secret=SECRET), "b": sketch(b, secret=SECRET)})[("a", "b")]
        fa = fingerprint(a, base, secret=SECRET, n=args.probes)
        fb = fingerprint(b, base, secret=SECRET, n=args.probes)
        fn = cosines({"a": fa, "b": fb})[("a", "b")]
        hid = cos(hidden_fingerprint(a, base, xs, layout), hidden_fingerprint(b, base, xs, layout))
        return raw, fn, hid

    print(
        f"| copy of honest miner 0 (shipped {SHIPPED}) | raw delta cosine | function cosine (Gaussian probes) | function cosine (hidden-state probes) |"
    )
    print("|---|---|---|---|")
    for name, c in copies.items():
        raw, fn, hid = measure(original, ship(c))
        print(f"| {name} | {raw:.4f} | {fn:.4f} | {hid:.4f} |")
    pairs = [
        (i, j, *measure(honest[i], honest[j]))
        for i, j in itertools.combinations(range(len(honest)), 2)
    ]
    for col, label in ((2, "raw"), (3, "function (Gaussian)"), (4, "function (hidden)")):
        i, j, *vals = max(pairs, key=lambda p: p[col])
        print(
            f"| closest honest pair by {label}: {i} & {j} | {vals[0]:.4f} | {vals[1]:.4f} | {vals[2]:.4f} |"
        )
    mean = [sum(p[c] for p in pairs) / len(pairs) for c in (2, 3, 4)]
    print(
        f"| mean over {len(pairs)} honest pairs | {mean[0]:.4f} | {mean[1]:.4f} | {mean[2]:.4f} |"
    )

    t = time.perf_counter()
    fingerprint(original, base, secret=SECRET, n=args.probes)
    small = time.perf_counter() - t
    print(
        f"\nfingerprint time: {small * 1e3:.1f} ms per delta here ({assignment.num_selected()} experts); "
        f"{big_expert_seconds(args.probes) * 1e3:.1f} ms per expert at the Qwen3-30B-A3B shape (CPU, "
        f"{torch.get_num_threads()} thread(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
