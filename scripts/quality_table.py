"""The quality table: does training only a domain's experts beat the alternatives on real text?

Run:  python scripts/quality_table.py [--quick] --out DIR [--base DIR]

On the tiny demo base (pre-trained on prose + code) and the held-out math domain, every method
trains at the same token budget: full fine-tuning, LoRA (PEFT, attention + experts), TEFT with
token-ratio and gate-score selection, TEFT on random experts of the same count, and TEFT with
4 contributors (disjoint data shards, a quarter of the budget each) averaged. Each method's
learning rate (and p for TEFT) is swept; points are chosen on the validation split and
reported on the held-out test split. Writes quality.json, quality.md and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAIN = "math"
GENERAL = ("prose", "code")


@dataclass(frozen=True)
class Preset:
    base_steps: int | None  # pre-training steps for the tiny base (None: the preset's own)
    steps: int  # optimizer steps per method (the token budget)
    batch_size: int
    seq_len: int
    val_batches: int
    test_batches: int
    grids: dict = field(default_factory=dict)  # method -> list of learning rates
    p_grid: dict = field(default_factory=dict)  # TEFT method -> list of p
    lora_rank: int = 8
    contributors: int = 4


QUICK = Preset(
    base_steps=300,
    steps=40,
    batch_size=8,
    seq_len=128,
    val_batches=4,
    test_batches=8,
    grids={
        "full": [3e-4],
        "lora": [3e-3],
        "teft-token-ratio": [3e-3],
        "teft-gate-score": [3e-3],
        "teft-random": [3e-3],
        "teft-4x-avg": [3e-3],
    },
    p_grid={"teft-token-ratio": [0.2], "teft-gate-score": [0.1]},
)
# Grids span the calibrated useful range of each method (see docs/quality.md for the sweep).
TEFT_LRS = [3e-4, 1e-3, 3e-3, 1e-2]
FULL = Preset(
    base_steps=None,
    steps=200,
    batch_size=8,
    seq_len=128,
    val_batches=12,
    test_batches=24,
    grids={
        "full": [3e-5, 1e-4, 3e-4, 1e-3],
        "lora": [3e-4, 1e-3, 3e-3, 1e-2],
        "teft-token-ratio": TEFT_LRS,
        "teft-gate-score": TEFT_LRS,
        "teft-random": TEFT_LRS,
        "teft-4x-avg": [1e-3, 3e-3, 1e-2, 3e-2],
    },
    p_grid={"teft-token-ratio": [0.1, 0.2, 0.3], "teft-gate-score": [0.05, 0.1, 0.2]},
)


@dataclass
class Point:
    """One trained configuration and its measurements."""

    method: str
    lr: float | None
    p: float | None
    val: dict  # split losses on validation: {"math": .., "prose": .., "code": ..}
    test: dict
    trainable_params: int
    artifact_bytes: int
    tokens_per_s: float | None
    peak_mib: float | None
    experts: int | None = None
    seconds: float = 0.0

    def general(self, split: str) -> float:
        d = getattr(self, split)
        return sum(d[g] for g in GENERAL) / len(GENERAL)


class Bench:
    """Holds the base, the data and the evaluation sets shared by every method."""

    def __init__(self, base_dir: Path, preset: Preset, progress: bool):
        import torch
        from transformers import AutoTokenizer

        from protocol.moe.data import load_blocks, sample_batches

        self.base_dir, self.preset, self.progress = base_dir, preset, progress
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        budget = preset.steps * preset.batch_size * preset.seq_len
        self.train = load_blocks(
            f"corpus:{DOMAIN}", "train", self.tokenizer, preset.seq_len, 2 * budget
        )
        self.eval = {}
        for split, n in (("val", preset.val_batches), ("test", preset.test_batches)):
            sets = {}
            for dom in (DOMAIN, *GENERAL):
                tokens = n * preset.batch_size * preset.seq_len
                blocks = load_blocks(f"corpus:{dom}", split, self.tokenizer, preset.seq_len, tokens)
                sets[dom] = sample_batches(blocks, preset.batch_size, n, seed=1234)
            self.eval[split] = sets
        torch.manual_seed(0)

    def model(self):
        from protocol.moe.model import load_model

        return load_model(self.base_dir, experts_implementation="grouped_mm")

    def batches(self, seed: int, shard: int = 0, shards: int = 1):
        from protocol.moe.data import batch_stream

        return batch_stream(self.train[shard::shards], self.preset.batch_size, seed)

    def evaluate(self, model) -> tuple[dict, dict]:
        from protocol.moe.evaluate import mean_loss

        return tuple(
            {dom: round(mean_loss(model, b), 5) for dom, b in self.eval[split].items()}
            for split in ("val", "test")
        )

    def cfg(self, lr: float, steps: int | None = None):
        from protocol.moe.train import TrainConfig
        from protocol.settings import TrainSettings

        steps = steps or self.preset.steps
        return TrainConfig(TrainSettings(steps=steps, lr=lr), warmup=max(1, steps // 10))


def train_memory_mib(model, params, batch, step_context=None, cfg=None) -> float:
    """Training memory of one step: weights + grads + AdamW state + saved activations (MiB).

    CPU has no allocator peak counter, so the dominant terms are measured directly: the bytes
    of every tensor autograd saves for backward (deduplicated by storage, so a view of a
    parameter costs nothing and a new tensor such as TEFT's `W[ids] + delta` counts in full)
    plus the parameter, gradient and optimizer-state bytes the method allocates. `cfg` (a
    TrainConfig) selects the loss (its settings' `loss_chunk`) and activation checkpointing as train_loop
    runs them. With checkpointing, the layers are measured unchecked and combined as the
    checkpointed step holds them: everything saved outside the decoder layers, every layer's
    inputs (kept for the recompute), and the largest single layer's saved tensors (the
    recompute of one layer at a time in backward).
    """
    from contextlib import nullcontext

    import torch

    from protocol.moe.train import TrainConfig, checkpointing_layers, lm_loss

    cfg = cfg or TrainConfig()
    state = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    weights = sum(t.untyped_storage().nbytes() for t in state.values())
    trainable = sum(p.numel() * p.element_size() for p in params)
    layers = checkpointing_layers(model)
    checkpointing = cfg.settings.gradient_checkpointing or any(
        m.gradient_checkpointing for m in layers
    )
    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, layer or None)
    inputs: dict[int, int] = {}  # storages of the layers' tensor arguments
    where: list[int | None] = [None]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in state and s.data_ptr() not in saved:
            saved[s.data_ptr()] = (s.nbytes(), where[0])
        return t

    def enter(i):
        def hook(module, args, kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() not in state:
                    inputs[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
                elif isinstance(a, tuple):  # position embeddings (cos, sin)
                    for b in a:
                        if isinstance(b, torch.Tensor):
                            inputs[b.untyped_storage().data_ptr()] = b.untyped_storage().nbytes()
            where[0] = i

        return hook

    def leave(module, args, output):
        where[0] = None

    was = [m.gradient_checkpointing for m in layers]
    handles = []
    for i, m in enumerate(layers):
        m.gradient_checkpointing = False  # measure every layer's saved tensors
        handles.append(m.register_forward_pre_hook(enter(i), with_kwargs=True))
        handles.append(m.register_forward_hook(leave))
    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            (step_context or nullcontext)(),
        ):
            loss = lm_loss(model, batch, chunk=cfg.settings.loss_chunk)
        del loss
    finally:
        for h in handles:
            h.remove()
        for m, w in zip(layers, was, strict=True):
            m.gradient_checkpointing = w
    if not checkpointing:
        activations = sum(b for b, _ in saved.values())
    else:
        kept = {p: b for p, (b, layer) in saved.items() if layer is None}
        kept.update(inputs)
        per_layer: dict[int, int] = {}
        for p, (b, layer) in saved.items():
            if layer is not None and p not in kept:
                per_layer[layer] = per_layer.get(layer, 0) + b
        activations = sum(kept.values()) + max(per_layer.values(), default=0)
    return (weights + 3 * trainable + activations) / 2**20


def run_full(bench: Bench, lr: float) -> Point:
    from protocol.moe.train import train_loop

    model = bench.model()
    params = list(model.parameters())
    mem = train_memory_mib(model, params, next(bench.batches(0)))
    r = train_loop(
        model,
        params,
        bench.batches(0),
        bench.cfg(lr),
        desc=f"full lr={lr}",
        progress=bench.progress,
    )
    val, test = bench.evaluate(model)
    n = sum(p.numel() for p in params)
    return Point("full", lr, None, val, test, n, n * 4, r.tokens_per_s, mem)


def run_lora(bench: Bench, lr: float) -> Point:
    from peft import LoraConfig, get_peft_model

    from protocol.moe.train import train_loop

    r_ = bench.preset.lora_rank
    cfg = LoraConfig(
        r=r_,
        lora_alpha=2 * r_,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(bench.model(), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    mem = train_memory_mib(model, params, next(bench.batches(0)))
    r = train_loop(
        model,
        params,
        bench.batches(0),
        bench.cfg(lr),
        desc=f"lora lr={lr}",
        progress=bench.progress,
    )
    val, test = bench.evaluate(model)
    n = sum(p.numel() for p in params)
    return Point("lora", lr, None, val, test, n, n * 4, r.tokens_per_s, mem)


def teft_delta(
    bench: Bench, model, assignment, lr: float, seed: int, shard=0, shards=1, steps=None
):
    from miner.teft import train_experts
    from protocol.moe.model import expert_layout

    layout = expert_layout(model)
    return train_experts(
        model,
        layout,
        assignment,
        bench.batches(seed, shard, shards),
        bench.cfg(lr, steps),
        progress=bench.progress,
        desc=f"teft {assignment.method} lr={lr}",
    )


def ship_and_apply(bench: Bench, model, assignment, delta, work: Path, tokens: int):
    """The real artifact path: write the delta file, read it back as untrusted, apply it."""
    from protocol.artifact.delta import DeltaMeta, apply_delta, write_delta
    from protocol.artifact.untrusted import read_delta_untrusted
    from protocol.moe.model import expert_layout
    from protocol.round.shards import UNSHARDED

    layout = expert_layout(model)
    path = work / f"delta-{assignment.hash()[:12]}.safetensors"
    meta = DeltaMeta(
        base_hash=assignment.model_hash,
        assignment_hash=assignment.hash(),
        round=0,
        tokens=tokens,
        shard=UNSHARDED,
    )
    write_delta(path, delta, meta)
    _, tensors = read_delta_untrusted(path, layout=layout, assignment=assignment, max_bytes=1 << 34)
    apply_delta(model, layout, tensors)
    return path.stat().st_size


def run_teft(bench: Bench, method: str, assignment, lr: float, work: Path) -> Point:
    from miner.teft import ExpertTrainer
    from protocol.moe.model import expert_layout

    model = bench.model()
    probe = ExpertTrainer(model, expert_layout(model), assignment)
    params = probe.attach()
    mem = train_memory_mib(model, params, next(bench.batches(0)), probe.step_context)
    n = sum(p.numel() for p in params)
    probe.detach()
    delta, r = teft_delta(bench, model, assignment, lr, seed=0)
    size = ship_and_apply(bench, model, assignment, delta, work, r.tokens)
    val, test = bench.evaluate(model)
    return Point(
        method, lr, assignment.p, val, test, n, size, r.tokens_per_s, mem, assignment.num_selected()
    )


def run_teft_avg(bench: Bench, assignment, lr: float, work: Path) -> Point:
    """k contributors on disjoint shards, each a 1/k share of the budget, deltas averaged."""
    from protocol.moe.merge import weighted_average

    k = bench.preset.contributors
    model = bench.model()
    deltas, speeds, tokens = [], [], 0
    for c in range(k):
        d, r = teft_delta(
            bench, model, assignment, lr, seed=c, shard=c, shards=k, steps=bench.preset.steps // k
        )
        deltas.append(d)
        speeds.append(r.tokens_per_s)
        tokens += r.tokens
    size = ship_and_apply(bench, model, assignment, weighted_average(deltas), work, tokens)
    val, test = bench.evaluate(model)
    n = (
        assignment.num_selected()
        * 3
        * model.config.hidden_size
        * model.config.moe_intermediate_size
    )
    return Point(
        f"teft-{k}x-avg",
        lr,
        assignment.p,
        val,
        test,
        n,
        size,
        sum(speeds) / k,
        None,
        assignment.num_selected(),
    )


def ensure_base(path: Path, preset: Preset) -> Path:
    from protocol.moe.demo_base import build_base

    if (path / "config.json").exists():
        return path
    print(f"building the tiny base -> {path}", flush=True)
    # Always show this bar: it is the longest silent step of the main job.
    report = build_base(path, "tiny", progress=True, steps=preset.base_steps)
    print(
        f"base built in {report['seconds']} s, routing: {json.dumps(report['routing'])}", flush=True
    )
    return path


def plan(bench: Bench, work: Path):
    """Yield (label, thunk) for every configuration of the sweep."""
    from protocol.moe.experts import random_like
    from protocol.moe.selection import select_experts

    pre = bench.preset
    model = bench.model()
    assignments = {}
    for method in ("token-ratio", "gate-score"):
        for p in pre.p_grid[f"teft-{method}"]:
            assignments[(method, p)] = select_experts(
                bench.base_dir,
                f"corpus:{DOMAIN}",
                method=method,
                p=p,
                tokens=1 << 17,
                seq_len=pre.seq_len,
                model=model,
                tokenizer=bench.tokenizer,
            )
    default_tr = assignments[
        (
            "token-ratio",
            0.2 if 0.2 in pre.p_grid["teft-token-ratio"] else pre.p_grid["teft-token-ratio"][0],
        )
    ]
    for lr in pre.grids["full"]:
        yield f"full lr={lr}", lambda lr=lr: run_full(bench, lr)
    for lr in pre.grids["lora"]:
        yield f"lora lr={lr}", lambda lr=lr: run_lora(bench, lr)
    for (method, p), a in assignments.items():
        for lr in pre.grids[f"teft-{method}"]:
            yield (
                f"teft-{method} p={p} lr={lr}",
                lambda a=a, lr=lr, m=method: run_teft(bench, f"teft-{m}", a, lr, work),
            )
    rnd = random_like(default_tr, seed=7)
    for lr in pre.grids["teft-random"]:
        yield f"teft-random lr={lr}", lambda lr=lr: run_teft(bench, "teft-random", rnd, lr, work)
    for lr in pre.grids["teft-4x-avg"]:
        yield f"teft-4x-avg lr={lr}", lambda lr=lr: run_teft_avg(bench, default_tr, lr, work)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a few minutes: short base, one point per method"
    )
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument(
        "--base", type=Path, default=None, help="reuse this tiny base (default: DIR/base)"
    )
    ap.add_argument(
        "--drift", type=float, default=None, help="general-loss drift budget for the matched table"
    )
    ap.add_argument("--progress", action="store_true", help="show per-run progress bars")
    args = ap.parse_args(argv)

    from protocol.ops.logs import quiet_third_party
    from scripts.quality_report import write_report

    quiet_third_party()

    preset = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = ensure_base(args.base or args.out / "base", preset)
    bench = Bench(base, preset, args.progress)
    base_val, base_test = bench.evaluate(bench.model())
    base_n = sum(p.numel() for p in bench.model().parameters())
    points = [Point("base", None, None, base_val, base_test, 0, 0, None, None)]
    work = args.out / "deltas"
    work.mkdir(exist_ok=True)
    for label, thunk in plan(bench, work):
        t = time.perf_counter()
        pt = thunk()
        pt.seconds = round(time.perf_counter() - t, 1)
        points.append(pt)
        print(
            f"{label:<36} val {pt.val[DOMAIN]:.4f} general {pt.general('val'):.4f} "
            f"test {pt.test[DOMAIN]:.4f} ({pt.seconds} s)",
            flush=True,
        )
    meta = {
        "preset": "quick" if args.quick else "full",
        "preset_values": asdict(preset),
        "base": str(base),
        "base_params": base_n,
        "domain": DOMAIN,
        "general": list(GENERAL),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    base_report = base / "moesaic_base.json"
    if base_report.exists():
        meta["base_report"] = json.loads(base_report.read_text())
    write_report(args.out, points, meta, args.drift)
    print(f"wrote {args.out / 'quality.md'}, quality.json, frontier.png in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
