"""Performance of moesaic as ratios against the alternatives, all measured in one run.

Run:  python scripts/bench.py [--quick] --out DIR [--base DIR] [--devnet-summary PATH]

Writes DIR/bench.json and DIR/bench.md. Every figure is a ratio of two things measured in the
same run on the same machine:

1. communication: bytes a miner uploads per round (a real delta file from
   `protocol.artifact.delta.write_delta`) against the full model's bf16 size, for the demo base and for
   a Qwen3-30B-A3B-shaped model (parameter count from a meta-device instance of the real
   config; delta bytes from a real file written for one layer of that shape, scaled by the
   number of experts and layers);
2. miner: TEFT tokens/s and training memory against full fine-tuning, same model and batches
   (`scripts/bench_train.py`'s measurement);
3. validator: time to score one submission (untrusted read + `Evaluator.evaluate`, base losses
   already computed) against one plain forward pass over the same eval tokens, and the memory
   it needs beyond the model;
4. merge: `protocol.moe.merge.weighted_average` throughput against raw safetensors reads of the
   same bytes;
5. devnet: the share of the protocol steps' process time outside training and evaluation
   (chain, storage, verification), read from `moesaic devnet --json-summary` when given;
6. compression of a real trained TEFT delta: the wire encodings (protocol.artifact.encodings: int8,
   lowrank<R>, lowrank<R>-int8, written and read back as a validator does) and benchmark-only
   top-k (scripts.compress): wire bytes against the share of the held-out domain loss
   improvement kept, one round and several rounds with the miner's error feedback; the
   recommended encoding is printed.

--quick builds the `test` preset base (seconds) and is the CI smoke test; the full preset
reuses runs/base-tiny when present (else builds the tiny base, ~8 min on 2 cores).

One file on purpose: six independent measurements and the one report that puts them side by
side (a good part of it renders the markdown); each section is a
function of a few dozen lines, and splitting them into modules would only scatter what a
reader compares.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAIN, GENERAL = "corpus:math", ("corpus:prose", "corpus:code")
TARGETS = {"comm_x": 1000.0, "kept": 0.9, "miner_tps_x": 1.4, "miner_mem_x": 0.4, "val_x": 1.15}

# Qwen/Qwen3-30B-A3B config.json (the published shape; 30.5B parameters in total).
QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    tie_word_embeddings=False,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)
# ESFT selects 5-15 % of a layer's experts (Wang et al. 2024); 16 of 128 is 12.5 %.
Q30_EXPERTS_PER_LAYER = 16


@dataclass(frozen=True)
class Preset:
    base_preset: str  # protocol.moe.demo_base preset built when no base is given or cached
    p: float  # ESFT token-ratio threshold of the assignment
    select_tokens: int  # domain tokens routed to select the experts
    batch_size: int
    seq_len: int
    lr: float
    steps: int  # TEFT steps of the reference delta; multi-round runs split them into rounds
    rounds: int
    eval_batches: int  # held-out batches of the domain and of the general mix, each
    miner_steps: int  # timed steps per method in the miner comparison
    miner_reps: int
    timing_reps: int  # validator and merge timings: best of this many
    merge_k: int  # deltas merged
    merge_experts: int  # experts of one 30B-shaped layer in each merged delta
    q30_sample_experts: int  # experts of one 30B-shaped layer actually written
    single_specs: tuple[str, ...]  # schemes measured on one round's delta
    ef_specs: tuple[str, ...]  # schemes measured over `rounds` rounds with error feedback
    plain_specs: tuple[str, ...]  # ... and without it, to show what the feedback buys


QUICK = Preset(
    base_preset="test",
    p=0.2,
    select_tokens=1 << 12,
    batch_size=8,
    seq_len=64,
    lr=1e-2,
    steps=8,
    rounds=2,
    eval_batches=2,
    miner_steps=2,
    miner_reps=1,
    timing_reps=2,
    merge_k=3,
    merge_experts=1,
    q30_sample_experts=1,
    single_specs=("bfloat16", "int8", "lowrank4", "lowrank4-int8", "topk:0.01"),
    ef_specs=("lowrank2-int8",),
    plain_specs=(),
)
FULL = Preset(
    base_preset="tiny",
    p=0.2,
    select_tokens=1 << 15,
    batch_size=8,
    seq_len=128,
    lr=3e-3,
    steps=200,
    rounds=4,
    eval_batches=12,
    miner_steps=20,
    miner_reps=2,
    timing_reps=7,
    merge_k=4,
    merge_experts=16,
    q30_sample_experts=Q30_EXPERTS_PER_LAYER,
    single_specs=(
        "bfloat16",
        "int8",
        "lowrank16",
        "lowrank8",
        "lowrank8-int8",
        "lowrank4",
        "lowrank4-int8",
        "lowrank2-int8",
        "topk:0.03",
        "topk:0.005",
    ),
    ef_specs=("lowrank4-int8", "lowrank2-int8"),
    plain_specs=("lowrank4-int8", "lowrank2-int8"),
)


def _cpu(fn) -> float:
    """CPU seconds of one call on one thread: wall clock on a shared 2-core machine measures
    the neighbours (a 3x spread was seen), CPU time of a single thread measures the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = time.process_time()
        fn()
        return time.process_time() - t
    finally:
        torch.set_num_threads(threads)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


class Context:
    """The demo base, its assignment, the data and the validator's evaluator, loaded once."""

    def __init__(self, base_dir: Path, preset: Preset, work: Path):
        import torch
        from transformers import AutoTokenizer

        from protocol.moe.data import load_blocks
        from protocol.moe.evaluate import Evaluator, build_eval_set
        from protocol.moe.model import expert_layout
        from protocol.moe.selection import select_experts

        self.base_dir, self.preset, self.work = base_dir, preset, work
        torch.manual_seed(0)
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.model = self.fresh_model()
        self.layout = expert_layout(self.model)
        self.assignment = select_experts(
            base_dir,
            DOMAIN,
            p=preset.p,
            tokens=preset.select_tokens,
            seq_len=preset.seq_len,
            model=self.model,
            tokenizer=self.tokenizer,
        )
        budget = preset.steps * preset.batch_size * preset.seq_len
        self.train_blocks = load_blocks(DOMAIN, "train", self.tokenizer, preset.seq_len, 2 * budget)
        self.eval_set = build_eval_set(
            self.tokenizer,
            DOMAIN,
            list(GENERAL),
            seed=1234,
            seq_len=preset.seq_len,
            batch_size=preset.batch_size,
            domain_batches=preset.eval_batches,
            general_batches=preset.eval_batches,
            max_tokens=4 * preset.eval_batches * preset.batch_size * preset.seq_len,
        )
        t = time.perf_counter()
        self.evaluator = Evaluator(self.model, self.layout, self.eval_set)
        self.base_losses_s = time.perf_counter() - t
        self.base_domain = _mean(self.evaluator.base_domain)
        self.base_general = _mean(self.evaluator.base_general)

    def fresh_model(self):
        from protocol.moe.model import load_model

        return load_model(self.base_dir, experts_implementation="grouped_mm")

    def train(self, steps: int, seed: int):
        """A TEFT delta of `steps` steps on the domain from the model's current weights."""
        from miner.teft import train_experts
        from protocol.moe.data import batch_stream
        from protocol.moe.train import TrainConfig
        from protocol.settings import TrainSettings

        cfg = TrainConfig(TrainSettings(steps=steps, lr=self.preset.lr), warmup=max(1, steps // 10))
        batches = batch_stream(self.train_blocks, self.preset.batch_size, seed)
        return train_experts(self.model, self.layout, self.assignment, batches, cfg, progress=False)

    def losses(self, delta) -> tuple[float, float]:
        """Mean held-out (domain, general) loss of base + delta (the model is reverted)."""
        dom, gen = self.evaluator.evaluate(delta)
        return _mean(dom), _mean(gen)

    def write(self, name: str, delta, encoding: str, assignment=None, base_hash=None) -> Path:
        from protocol.artifact.delta import DeltaMeta, write_delta
        from protocol.round.shards import UNSHARDED

        a = assignment or self.assignment
        path = self.work / name
        meta = DeltaMeta(
            base_hash=base_hash or a.model_hash,
            assignment_hash=a.hash(),
            round=0,
            tokens=self.preset.steps * self.preset.batch_size * self.preset.seq_len,
            shard=UNSHARDED,
            encoding=encoding,
        )
        write_delta(path, delta, meta)
        return path


# ----------------------------------------------------------------------------- Qwen3-30B shape


class Q30:
    """Qwen3-30B-A3B shape: parameter count on the meta device, one real layer of delta."""

    def __init__(self, sample_experts: int):
        import torch
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        from protocol.identity.hashing import sha256_json
        from protocol.moe.experts import Assignment
        from protocol.moe.model import expert_layout

        with torch.device("meta"):
            full = Qwen3MoeForCausalLM(Qwen3MoeConfig(**QWEN3_30B_A3B))
            self.params = sum(p.numel() for p in full.parameters())
            self.layout_full = expert_layout(full)
            del full
            # The reduced model: one decoder layer of the real shape (meta, no memory).
            one = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**QWEN3_30B_A3B, "num_hidden_layers": 1}))
            self.layout = expert_layout(one)
            del one
        self.layers = len(self.layout_full.moe_layers)
        self.num_experts = self.layout.num_experts
        self.sample_experts = sample_experts
        self.model_hash = sha256_json(QWEN3_30B_A3B)
        self.full_bf16_bytes = 2 * self.params
        self.trained_params = (
            Q30_EXPERTS_PER_LAYER * self.layers * self.layout_full.params_per_expert()
        )
        self.Assignment = Assignment

    def assignment(self, experts: int):
        """`experts` experts of layer 0, spread over the layer (which ones does not matter)."""
        step = self.num_experts // experts
        ids = tuple(range(0, step * experts, step))
        return self.Assignment({0: ids}, "token-ratio", 0.2, self.model_hash, self.num_experts)

    def delta(self, experts: int, seed: int):
        """Random trained-minus-base tensors of one layer's `experts` experts (real shapes)."""
        import torch

        from protocol.artifact.delta import expert_keys, parse_expert_key

        g = torch.Generator().manual_seed(seed)
        out = {}
        for key in expert_keys(self.layout, self.assignment(experts)):
            proj = parse_expert_key(key)[3]
            out[key] = torch.randn(*self.layout.proj_shape(proj), generator=g) * 1e-4
        return out

    def scale(self, sample_bytes: int, sample_experts: int | None = None) -> int:
        """Per-round bytes of the whole model's assignment from one sampled layer's bytes."""
        n = sample_experts or self.sample_experts
        return round(sample_bytes * Q30_EXPERTS_PER_LAYER / n * self.layers)


# ----------------------------------------------------------------------------- sections


def communication(ctx: Context, ref_delta, q30: Q30) -> tuple[dict, dict]:
    """Delta file bytes vs full-model bf16 bytes; returns (section, q30 sample for compression)."""
    n_params = sum(p.numel() for p in ctx.model.parameters())
    full_bf16 = 2 * n_params
    demo = {"params": n_params, "full_bf16_bytes": full_bf16}
    demo["experts_selected"] = ctx.assignment.num_selected()
    demo["experts_total"] = ctx.layout.num_experts * len(ctx.layout.moe_layers)
    for enc in ("float32", "bfloat16"):
        size = ctx.write(f"demo-{enc}.safetensors", ref_delta, enc).stat().st_size
        demo[f"delta_{enc}_bytes"] = size
        demo[f"x_smaller_{enc}"] = full_bf16 / size

    sample = q30.delta(q30.sample_experts, seed=0)
    a = q30.assignment(q30.sample_experts)
    big = {
        "params": q30.params,
        "full_bf16_bytes": q30.full_bf16_bytes,
        "layers": q30.layers,
        "experts_per_layer": q30.num_experts,
        "experts_selected_per_layer": Q30_EXPERTS_PER_LAYER,
        "sample_layers_written": 1,
        "sample_experts_written": q30.sample_experts,
    }
    for enc in ("float32", "bfloat16"):
        path = ctx.write(f"q30-{enc}.safetensors", sample, enc, a, q30.model_hash)
        size = path.stat().st_size
        path.unlink()  # up to 300 MB: keep the output folder small
        big[f"sample_file_bytes_{enc}"] = size
        big[f"delta_{enc}_bytes"] = q30.scale(size)
        big[f"x_smaller_{enc}"] = q30.full_bf16_bytes / q30.scale(size)
    # Bytes are linear in the expert count: other ESFT shares from the same measurement.
    per_expert = big["sample_file_bytes_bfloat16"] / q30.sample_experts
    big["x_smaller_bfloat16_by_share"] = {
        f"{e / q30.num_experts:.4f}": q30.full_bf16_bytes / (per_expert * e * q30.layers)
        for e in (8, 16, 19)
    }
    how = (
        f"Full-model bytes: 2 x the parameter count of a meta-device Qwen3MoeForCausalLM built "
        f"from the Qwen3-30B-A3B config ({q30.params:,} parameters). Delta bytes: a real "
        f"write_delta file for {q30.sample_experts} expert(s) of one layer of that shape (random "
        f"values, the real [768, 2048] projections), scaled by {Q30_EXPERTS_PER_LAYER}/"
        f"{q30.sample_experts} experts and {q30.layers} layers (an ESFT assignment of "
        f"{Q30_EXPERTS_PER_LAYER} of {q30.num_experts} experts in every layer, 12.5 %)."
    )
    return {"demo": demo, "qwen3_30b_a3b": big, "how": how}, sample


def _min_side(tensors) -> int:
    return min(min(t.shape) for t in tensors.values())


def _same_fraction(spec: str, demo_side: int, q30_side: int) -> str | None:
    """lowrank<R>[-int8] at the 30B shape keeping the same fraction R / demo_side of each
    projection's rank (the conservative scaling; None for other schemes)."""
    from protocol.artifact.encodings import is_encoding, parse_encoding

    if not is_encoding(spec) or parse_encoding(spec).kind != "lowrank":
        return None
    enc = parse_encoding(spec)
    rank = max(1, round(min(enc.rank, demo_side) * q30_side / demo_side))
    return f"lowrank{rank}" + ("-int8" if enc.int8 else "")


def compression(ctx: Context, ref_delta, ref_losses, q30: Q30, q30_sample) -> dict:
    """Wire bytes vs the share of the domain-loss improvement kept, per scheme.

    Wire encodings (protocol.artifact.encodings: int8, lowrank<R>, lowrank<R>-int8) are measured as a
    miner ships them: a real write_delta file, read back through the validator's untrusted
    reader. top-k (scripts.compress) is a benchmark-only scheme, measured from its
    serialisation."""
    from miner.feedback import corrected, residual_of
    from protocol.artifact.delta import max_delta_bytes, wire_roundtrip
    from protocol.artifact.encodings import is_encoding
    from protocol.artifact.untrusted import read_delta_untrusted
    from scripts.compress import ErrorFeedback, decode, encode, roundtrip

    pre = ctx.preset
    base_dom = ctx.base_domain
    full_demo = 2 * sum(p.numel() for p in ctx.model.parameters())
    q30_a = q30.assignment(q30.sample_experts)
    demo_side, q30_side = _min_side(ref_delta), _min_side(q30_sample)
    q30_cache: dict[str, int] = {}

    def q30_bytes(spec: str) -> int:
        if spec not in q30_cache:
            if is_encoding(spec):
                path = ctx.write("q30-enc.safetensors", q30_sample, spec, q30_a, q30.model_hash)
                q30_cache[spec] = q30.scale(path.stat().st_size)
                path.unlink()
            else:
                q30_cache[spec] = q30.scale(encode(q30_sample, spec).wire_bytes())
        return q30_cache[spec]

    def shipped(delta, spec: str) -> tuple[dict, int]:
        """(what the validator decodes, bytes on the wire) for one delta."""
        if not is_encoding(spec):
            return roundtrip(delta, spec)
        path = ctx.write("demo-enc.safetensors", delta, spec)
        limit = max_delta_bytes(ctx.layout, ctx.assignment)
        got = read_delta_untrusted(
            path, layout=ctx.layout, assignment=ctx.assignment, max_bytes=limit
        )
        return got[1], path.stat().st_size

    bf16_bytes = shipped(ref_delta, "bfloat16")[1]

    def row(spec, mode, wire, losses, ref):
        dom, gen = losses
        fraction = _same_fraction(spec, demo_side, q30_side)
        return {
            "scheme": spec,
            "on_the_wire": is_encoding(spec),
            "mode": mode,
            "wire_bytes": wire,
            "x_vs_bf16_delta": bf16_bytes / wire,
            "x_smaller_demo": full_demo / wire,
            "q30_wire_bytes": q30_bytes(spec),
            "x_smaller_q30": q30.full_bf16_bytes / q30_bytes(spec),
            **(
                {
                    "q30_same_rank_fraction": fraction,
                    "x_smaller_q30_same_fraction": q30.full_bf16_bytes / q30_bytes(fraction),
                }
                if fraction
                else {}
            ),
            "domain_loss": dom,
            "general_loss": gen,
            "kept": (base_dom - dom) / (base_dom - ref[0]),
        }

    rows = [row("float32", "one round", shipped(ref_delta, "float32")[1], ref_losses, ref_losses)]
    for spec in pre.single_specs:
        dec, wire = shipped(ref_delta, spec)
        rows.append(row(spec, "one round", wire, ctx.losses(dec), ref_losses))

    def rounds(spec: str | None, feedback: bool):
        """`rounds` rounds of steps/rounds each from the updated model; returns (sum, bytes).
        Wire encodings use the miner's own error feedback (miner.feedback)."""
        from protocol.artifact.delta import apply_delta

        total: dict = {}
        ef = ErrorFeedback(spec) if spec and feedback and not is_encoding(spec) else None
        residual: dict = {}
        wires = []
        for r in range(pre.rounds):
            with apply_delta(ctx.model, ctx.layout, total):
                d, _ = ctx.train(pre.steps // pre.rounds, seed=100 + r)
            if spec is None:
                sent = d
            elif ef is not None:
                enc = ef.encode(d)
                sent = decode(enc)
                wires.append(enc.wire_bytes())
            elif is_encoding(spec) and feedback:
                fixed = corrected(d, residual)
                sent = wire_roundtrip(fixed, spec)
                residual = residual_of(fixed, sent)
                wires.append(shipped(fixed, spec)[1])
            else:
                sent, wire = shipped(d, spec)
                wires.append(wire)
            total = {k: total[k] + sent[k] if k in total else sent[k].clone() for k in sent}
        return total, (round(_mean(wires)) if wires else None)

    multi = {}
    if pre.ef_specs or pre.plain_specs:
        t, _ = rounds(None, False)
        multi_ref = ctx.losses(t)
        multi["reference"] = {"domain_loss": multi_ref[0], "general_loss": multi_ref[1]}
        tag = f"{pre.rounds} rounds"
        for spec in pre.ef_specs:
            t, wire = rounds(spec, True)
            rows.append(row(spec, f"{tag} + error feedback", wire, ctx.losses(t), multi_ref))
        for spec in pre.plain_specs:
            t, wire = rounds(spec, False)
            rows.append(row(spec, f"{tag}, no feedback", wire, ctx.losses(t), multi_ref))

    # The default must keep >= 90 % from a single round's delta: a miner paid per round cannot
    # count on later rounds to deliver what its encoding dropped (multi-round rows are shown).
    wire_rows = [
        r
        for r in rows
        if r["on_the_wire"] and r["scheme"] != "float32" and r["mode"] == "one round"
    ]
    ok = [r for r in wire_rows if r["kept"] >= TARGETS["kept"]]
    pick = (
        max(ok, key=lambda r: r["x_smaller_q30"]) if ok else max(wire_rows, key=lambda r: r["kept"])
    )
    best_comm = max(
        (r for r in rows if r["x_smaller_q30"] >= TARGETS["comm_x"]),
        key=lambda r: r["kept"],
        default=None,
    )
    return {
        "reference": {
            "steps": pre.steps,
            "rounds": pre.rounds,
            "base_domain_loss": base_dom,
            "domain_loss": ref_losses[0],
            "general_loss": ref_losses[1],
            "base_general_loss": ctx.base_general,
            "improvement_nats": base_dom - ref_losses[0],
            "demo_projection_min_side": demo_side,
            "q30_projection_min_side": q30_side,
            **({"multi_round": multi} if multi else {}),
        },
        "rows": rows,
        "recommended": {"scheme": pick["scheme"], "mode": pick["mode"]},
        "best_at_1000x": (
            {"scheme": best_comm["scheme"], "mode": best_comm["mode"], "kept": best_comm["kept"]}
            if best_comm
            else None
        ),
        "how": (
            "kept = (base - compressed) / (base - uncompressed) domain held-out loss (test split). "
            "Wire encodings: a real write_delta file read back with read_delta_untrusted (the "
            "validator's view); top-k is benchmark-only (scripts.compress). One round: the "
            "reference delta compressed once. Multi-round: the same training split into rounds, "
            "each round trained from base + everything sent so far (error feedback: the miner's "
            "residual, miner.feedback), compared with the same rounds uncompressed. Qwen3-30B "
            "bytes: the one-layer 30B-shaped sample written with the same encoding, scaled like "
            "the communication section. Low rank keeps the same rank R at both shapes (low-rank "
            "fine-tuning updates need a rank that does not grow with the matrix: Hu et al. 2021, "
            f"LoRA); on the demo base R is R/{demo_side} of a projection's rank, on the 30B shape "
            f"R/{q30_side}, so the kept share is measured at the demo's larger fraction. The "
            "conservative column keeps the demo's fraction at the 30B shape instead."
        ),
    }


MINER_VARIANTS = {  # name -> TrainSettings memory options, the same on both sides of each ratio
    "plain": {},
    "checkpointing": {"gradient_checkpointing": True},
    "checkpointing + chunked loss": {"gradient_checkpointing": True, "loss_chunk": 256},
}


def miner(ctx: Context, q30: Q30) -> dict:
    """TEFT vs full fine-tuning, same model and batches (bench_train's measurement), with the
    same memory options on both sides; the targets read the plain variant."""
    from miner.teft import ExpertTrainer
    from protocol.moe.model import expert_layout
    from scripts.bench_train import _measure

    pre = ctx.preset
    ns = SimpleNamespace(steps=pre.miner_steps, batch_size=pre.batch_size, seq_len=pre.seq_len)
    variants = {}
    for name, options in MINER_VARIANTS.items():
        runs = {"full": [], "teft": []}
        for _ in range(pre.miner_reps):  # interleaved, so slow spells hit both methods
            m = ctx.fresh_model()
            runs["full"].append(_measure(m, list(m.parameters()), ns, **options))
            m = ctx.fresh_model()
            trainer = ExpertTrainer(m, expert_layout(m), ctx.assignment)
            runs["teft"].append(_measure(m, trainer.attach(), ns, trainer.step_context, **options))
        full_tps = max(r[0] for r in runs["full"])
        teft_tps = max(r[0] for r in runs["teft"])
        full_mem, teft_mem = runs["full"][0][1], runs["teft"][0][1]
        variants[name] = {
            "options": options,
            "full_tokens_per_s": full_tps,
            "teft_tokens_per_s": teft_tps,
            "tokens_per_s_x": teft_tps / full_tps,
            "full_train_mib": full_mem,
            "teft_train_mib": teft_mem,
            "memory_x": teft_mem / full_mem,
        }
    # Qwen3-30B-A3B model-state memory, computed (ZeRO accounting, activations excluded):
    # full FT keeps bf16 weights + bf16 grads + fp32 master, m, v = 16 B per parameter; TEFT
    # keeps frozen bf16 weights (2 B) plus fp32 delta, grad, m, v (16 B) per trained parameter.
    full_state = 16 * q30.params
    teft_state = 2 * q30.params + 16 * q30.trained_params
    return {
        "batch": [pre.batch_size, pre.seq_len],
        "timed_steps": pre.miner_steps,
        "reps": pre.miner_reps,
        **variants["plain"],
        "variants": variants,
        "q30_state_gib_computed": {
            "full": full_state / 2**30,
            "teft": teft_state / 2**30,
            "x": teft_state / full_state,
        },
        "how": (
            "tokens/s: best of the interleaved repetitions of scripts/bench_train.py's _measure "
            "(3 warm-up steps, then timed steps on identical random-token batches). Memory: "
            "weights + grads + AdamW state + saved activations of one step (CPU has no peak "
            "counter). Full fine-tuning runs transformers' grouped_mm expert kernel as is; TEFT "
            "runs miner/teft.py's expert path (the frozen experts through the same kernel, the "
            "selected ones through a second grouped GEMM with the routing weight folded in), so "
            "part of TEFT's speed is that leaner path, not only the skipped weight gradients. "
            "The Qwen3-30B row is computed, not measured."
        ),
    }


def validator(ctx: Context, delta_path: Path, other: dict[str, Path]) -> dict:
    """Scoring one submission vs one plain forward pass over the same eval tokens; `other`
    encodings' files (name -> path) are scored too, as extra rows."""
    from protocol.moe.evaluate import batch_losses

    pre = ctx.preset
    batches = [*ctx.eval_set.domain, *ctx.eval_set.general]
    fwd = []
    paths = {"float32": delta_path, **other}
    times: dict[str, tuple[list, list]] = {name: ([], []) for name in paths}
    for _ in range(pre.timing_reps):  # interleaved for the same reason as the miner's
        fwd.append(_cpu(lambda: batch_losses(ctx.model, batches)))
        for name, path in paths.items():
            scr, rd = times[name]
            scr.append(_cpu(lambda p=path: ctx.evaluator.evaluate(_validator_read(ctx, p))))
            rd.append(_cpu(lambda p=path: _validator_read(ctx, p)))
    rows = [_validator_row(ctx, name, path, fwd, *times[name]) for name, path in paths.items()]
    tokens = sum(b.numel() for b in batches)
    return {
        "eval_tokens": tokens,
        "forward_s": min(fwd),
        **{k: v for k, v in rows[0].items() if k != "encoding"},
        "base_losses_once_s": ctx.base_losses_s,
        "encodings": rows,
        "how": (
            "score = read_delta_untrusted as the validator calls it (every check; a compressed "
            "delta kept as its wire tensors and decoded a projection at a time) + "
            "Evaluator.evaluate (apply in place, domain + general batches, revert); forward = "
            "batch_losses over the same batches. CPU seconds on one thread, best of the "
            "interleaved repetitions; the target reads the float32 row. Memory beyond the "
            "model: the delta as held plus the original slices apply_delta saves to revert "
            "bit-exactly (activations are the same as the plain forward's). A round holds one "
            "delta at a time whatever the number of miners: copy detection works on 256 KiB "
            "sketches (protocol.artifact.sketch), of which the validator keeps 8 rounds' worth."
        ),
    }


def _validator_read(ctx: Context, path: Path):
    from protocol.artifact.delta import max_delta_bytes
    from protocol.artifact.untrusted import read_delta_untrusted

    limit = max_delta_bytes(ctx.layout, ctx.assignment)
    return read_delta_untrusted(
        path, layout=ctx.layout, assignment=ctx.assignment, max_bytes=limit, lazy=True
    )[1]


def _validator_row(ctx: Context, name: str, path: Path, fwd, scr, rd) -> dict:
    import math

    from protocol.artifact.delta import delta_shapes, held_bytes

    tensors = _validator_read(ctx, path)
    model_bytes = sum(t.numel() * t.element_size() for t in ctx.model.state_dict().values())
    elem = next(ctx.model.parameters()).element_size()
    saved = sum(math.prod(s) for s in delta_shapes(tensors).values()) * elem  # the originals
    beyond = held_bytes(tensors) + saved
    return {
        "encoding": name,
        "score_s": min(scr),
        "read_verify_s": min(rd),
        "score_x_forward": min(scr) / min(fwd),
        "score_x_forward_median": statistics.median(scr) / statistics.median(fwd),
        "delta_file_bytes": path.stat().st_size,
        "memory_beyond_model_bytes": beyond,
        "memory_beyond_model_share": beyond / model_bytes,
        "model_bytes": model_bytes,
    }


def merge(ctx: Context, q30: Q30) -> dict:
    """weighted_average throughput vs raw safetensors reads of the same bytes."""
    from safetensors.torch import load

    from protocol.moe.merge import streamed_average, weighted_average

    pre = ctx.preset
    a = q30.assignment(pre.merge_experts)
    paths = [
        ctx.write(
            f"merge-{i}.safetensors",
            q30.delta(pre.merge_experts, seed=10 + i),
            "bfloat16",
            a,
            q30.model_hash,
        )
        for i in range(pre.merge_k)
    ]
    total = sum(p.stat().st_size for p in paths)
    loaded: dict = {}

    def read():
        # read_bytes + load: every byte goes through memory (load_file maps the file lazily
        # and measured 125 GB/s, i.e. nothing).
        loaded["d"] = [load(p.read_bytes()) for p in paths]

    weights = [float(i + 1) for i in range(pre.merge_k)]

    def streamed():  # the merger's path: one delta in memory at a time
        return streamed_average((load(p.read_bytes()) for p in paths), weights)

    t_read, t_merge, t_both, t_stream = [], [], [], []
    for _ in range(pre.timing_reps):
        t_read.append(_cpu(read))
        t_merge.append(_cpu(lambda: weighted_average(loaded["d"], weights)))
        t_both.append(_cpu(lambda: (read(), weighted_average(loaded["d"], weights))))
        t_stream.append(_cpu(streamed))
    loaded.clear()
    for p in paths:
        p.unlink()
    r, m, b, st = min(t_read), min(t_merge), min(t_both), min(t_stream)
    return {
        "k": pre.merge_k,
        "bytes": total,
        "delta_shape": f"{pre.merge_experts} experts of one Qwen3-30B-A3B-shaped layer, bf16",
        "read_bytes_per_s": total / r,
        "merge_bytes_per_s": total / m,
        "read_and_merge_bytes_per_s": total / b,
        "merge_x_read": r / m,
        "streamed_bytes_per_s": total / st,
        "how": (
            "read = read_bytes + safetensors load of the K files just written (page cache warm: "
            "the best case for reading); CPU seconds on one thread, best of the repetitions; merge = weighted_average of the loaded deltas (float32 "
            "accumulation). merge_x_read > 1 means merging is faster than reading the bytes. "
            "Streamed: streamed_average over the files read one at a time, as the merger does "
            "(one delta in memory, not K)."
        ),
    }


def devnet(path: Path | None) -> dict:
    """The devnet's share of round wall time outside training and evaluation, when measured."""
    out = {"devnet_overhead_share": None, "source": str(path) if path else None}
    if path is None or not path.exists():
        out["note"] = (
            "not measured (pass --devnet-summary PATH from `moesaic devnet --json-summary`)"
        )
        return out
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        out["note"] = f"not measured ({path}: {e})"
        return out
    share = _overhead_share(data)
    if share is None:
        out["note"] = "not measured: the summary has no time_split.overhead_share"
    else:
        out["devnet_overhead_share"] = share
    return out


def _overhead_share(data) -> float | None:
    """The devnet summary's time_split.overhead_share (moesaic/devnet/summary.py): process
    seconds in chain, storage and verification steps over all protocol-step seconds."""
    split = data.get("time_split") if isinstance(data, dict) else None
    v = split.get("overhead_share") if isinstance(split, dict) else None
    return float(v) if isinstance(v, int | float) and math.isfinite(v) else None


# ----------------------------------------------------------------------------- report


def targets(res: dict) -> list[dict]:
    comp = res["compression"]
    rec = next(
        r
        for r in comp["rows"]
        if (r["scheme"], r["mode"]) == (comp["recommended"]["scheme"], comp["recommended"]["mode"])
    )
    m, v = res["miner"], res["validator"]
    out = [
        (
            "communication (recommended scheme, Qwen3-30B shape) x smaller",
            rec["x_smaller_q30"],
            ">=",
            TARGETS["comm_x"],
        ),
        ("improvement kept by the recommended scheme", rec["kept"], ">=", TARGETS["kept"]),
        ("miner tokens/s vs full fine-tuning", m["tokens_per_s_x"], ">=", TARGETS["miner_tps_x"]),
        ("miner training memory vs full fine-tuning", m["memory_x"], "<=", TARGETS["miner_mem_x"]),
        ("validator scoring vs one forward pass", v["score_x_forward"], "<=", TARGETS["val_x"]),
    ]
    rows = []
    for name, got, op, want in out:
        met = got >= want if op == ">=" else got <= want
        rows.append(
            {
                "target": name,
                "measured": got,
                "op": op,
                "wanted": want,
                "met": met,
                "distance": got / want,
            }
        )
    return rows


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def render_md(res: dict) -> str:
    c, m, v, g, comp = (
        res["communication"],
        res["miner"],
        res["validator"],
        res["merge"],
        res["compression"],
    )
    d, q = c["demo"], c["qwen3_30b_a3b"]
    L = [
        "# Benchmarks: measured ratios",
        "",
        f"`python scripts/bench.py{' --quick' if res['preset'] == 'quick' else ''} --out DIR`, "
        f"{res['seconds']:.0f} s on {res['machine']['cpus']} CPU cores ({res['machine']['processor']}), "
        f"torch {res['machine']['torch']}, no GPU. Demo base: `{res['base']['dir']}` "
        f"({res['base']['preset']} preset, {d['params']:,} parameters). Every ratio compares two "
        "things measured in this run; the CPU figures are the CI baseline.",
        *(["", f"Note: {res['remeasured']}."] if res.get("remeasured") else []),
        "",
        "## Targets (issue 7)",
        "",
        "| target | measured | wanted | met | measured / wanted |",
        "|---|---:|---:|---|---:|",
    ]
    for t in res["targets"]:
        L.append(
            f"| {t['target']} | {t['measured']:.3g} | {t['op']} {t['wanted']:g} | "
            f"{'yes' if t['met'] else 'no'} | {t['distance']:.3g} |"
        )
    L += [
        "",
        "## 1. Communication: bytes a miner uploads per round",
        "",
        "| model | full model bf16 | delta file (fp32) | x smaller | delta file (bf16) | x smaller | recommended compression | x smaller |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rec = next(
        r
        for r in comp["rows"]
        if (r["scheme"], r["mode"]) == (comp["recommended"]["scheme"], comp["recommended"]["mode"])
    )
    L.append(
        f"| demo base ({d['experts_selected']} of {d['experts_total']} experts) | {_mb(d['full_bf16_bytes'])} | "
        f"{_mb(d['delta_float32_bytes'])} | {d['x_smaller_float32']:.1f}x | {_mb(d['delta_bfloat16_bytes'])} | "
        f"{d['x_smaller_bfloat16']:.1f}x | {_mb(rec['wire_bytes'])} | {rec['x_smaller_demo']:.0f}x |"
    )
    L.append(
        f"| Qwen3-30B-A3B shape ({q['experts_selected_per_layer']} of {q['experts_per_layer']} experts x "
        f"{q['layers']} layers) | {_mb(q['full_bf16_bytes'])} | {_mb(q['delta_float32_bytes'])} | "
        f"{q['x_smaller_float32']:.1f}x | {_mb(q['delta_bfloat16_bytes'])} | {q['x_smaller_bfloat16']:.1f}x | "
        f"{_mb(rec['q30_wire_bytes'])} | {rec['x_smaller_q30']:.0f}x |"
    )
    shares = ", ".join(
        f"{float(k):.1%}: {x:.1f}x" for k, x in q["x_smaller_bfloat16_by_share"].items()
    )
    L += ["", c["how"], f"Other ESFT shares (bf16 delta): {shares}.", ""]
    r = comp["reference"]
    L += [
        "## 6. Delta compression on the wire",
        "",
        f"Reference: a TEFT delta of {r['steps']} steps on math lowers the held-out math loss "
        f"{r['base_domain_loss']:.4f} -> {r['domain_loss']:.4f} ({r['improvement_nats']:.3f} nats; "
        f"general {r['base_general_loss']:.4f} -> {r['general_loss']:.4f}).",
        "",
        "| scheme | mode | demo wire bytes | x vs bf16 delta | Qwen3-30B per round | x smaller than full bf16 (30B) | 30B at the demo's rank fraction | math loss | kept |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in comp["rows"]:
        name = row["scheme"] if row["on_the_wire"] else f"{row['scheme']} (not a wire encoding)"
        frac = (
            f"{row['x_smaller_q30_same_fraction']:.0f}x (`{row['q30_same_rank_fraction']}`)"
            if "q30_same_rank_fraction" in row
            else "-"
        )
        L.append(
            f"| {name} | {row['mode']} | {row['wire_bytes']:,} | {row['x_vs_bf16_delta']:.1f} | "
            f"{_mb(row['q30_wire_bytes'])} | {row['x_smaller_q30']:.0f}x | {frac} | "
            f"{row['domain_loss']:.4f} | {row['kept']:.1%} |"
        )
    best = comp["best_at_1000x"]
    L += [
        "",
        f"**Recommended: `{comp['recommended']['scheme']}` ({comp['recommended']['mode']})**: the "
        "wire encoding with the smallest 30B-shape size that keeps >= 90 % of the improvement from "
        "one round's delta (a miner is paid per round, so the default does not count on error "
        "feedback delivering the rest later). "
        + (
            f"Best at >= 1000x (30B shape): `{best['scheme']}` ({best['mode']}) keeps {best['kept']:.0%}."
            if best
            else "No measured scheme reaches 1000x on the 30B shape."
        ),
        "",
        comp["how"],
        "",
        "## 2. Miner: TEFT vs full fine-tuning (same model, same batches)",
        "",
        f"| options (both sides) | full tokens/s | TEFT ({d['experts_selected']} experts) tokens/s | ratio | full MiB | TEFT MiB | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {x['full_tokens_per_s']:,.0f} | {x['teft_tokens_per_s']:,.0f} | "
            f"{x['tokens_per_s_x']:.2f}x | {x['full_train_mib']:.1f} | {x['teft_train_mib']:.1f} | "
            f"{x['memory_x']:.2f}x |"
            for name, x in m["variants"].items()
        ),
        "",
        "The targets read the plain row (no option on either side).",
        "",
        f"Qwen3-30B-A3B model-state memory (computed, not measured): full fine-tune "
        f"{m['q30_state_gib_computed']['full']:,.0f} GiB, TEFT {m['q30_state_gib_computed']['teft']:,.0f} GiB "
        f"({m['q30_state_gib_computed']['x']:.2f}x). {m['how']}",
        "",
        "## 3. Validator: scoring one submission vs one forward pass",
        "",
        "| delta encoding | eval tokens | forward | score (read + verify + apply + eval + revert) | ratio | of which read + verify | memory beyond the model |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {e['encoding']} | {v['eval_tokens']:,} | {v['forward_s'] * 1e3:.1f} ms | "
            f"{e['score_s'] * 1e3:.1f} ms | {e['score_x_forward']:.3f}x | "
            f"{e['read_verify_s'] * 1e3:.1f} ms | {e['memory_beyond_model_bytes'] / 2**20:.2f} MiB "
            f"({e['memory_beyond_model_share']:.1%} of the model) |"
            for e in v["encodings"]
        ],
        "",
        f"Base losses are computed once per round ({v['base_losses_once_s'] * 1e3:.0f} ms here) and "
        f"reused for every miner. Median ratio: {v['score_x_forward_median']:.3f}x. {v['how']}",
        "",
        "## 4. Merge throughput vs raw reads",
        "",
        "| K deltas | bytes | raw safetensors read | weighted_average | read + merge | streamed read + merge | merge / read |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {g['k']} | {_mb(g['bytes'])} | {g['read_bytes_per_s'] / 1e6:,.0f} MB/s | "
        f"{g['merge_bytes_per_s'] / 1e6:,.0f} MB/s | {g['read_and_merge_bytes_per_s'] / 1e6:,.0f} MB/s | "
        f"{g['streamed_bytes_per_s'] / 1e6:,.0f} MB/s | {g['merge_x_read']:.2f}x |",
        "",
        f"Deltas: {g['delta_shape']}. {g['how']}",
        "",
        "## 5. Devnet overhead",
        "",
    ]
    dv = res["devnet"]
    share = dv["devnet_overhead_share"]
    L.append(
        f"Share of the protocol steps' process time outside training and evaluation (chain, "
        f"storage, verification, signing): {share:.1%} ({dv['source']})."
        if share is not None
        else f"Share of a round's wall time outside training and evaluation: {dv['note']}."
    )
    return "\n".join(L) + "\n"


def _shown(path: Path) -> str:
    """A path relative to the repository when it is inside it (results stay portable)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def resolve_base(args, preset: Preset, out: Path) -> Path:
    from protocol.moe.demo_base import build_base

    if args.base:
        return args.base
    cached = ROOT / "runs" / f"base-{preset.base_preset}"
    if (cached / "config.json").exists():
        return cached
    path = out / "base"
    if not (path / "config.json").exists():
        print(f"building the {preset.base_preset} base -> {path}", flush=True)
        build_base(path, preset.base_preset, progress=preset.base_preset != "test")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI smoke preset (test base, ~1 min)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--base", type=Path, default=None, help="demo base directory to reuse")
    ap.add_argument("--devnet-summary", type=Path, default=None, help="moesaic devnet JSON summary")
    args = ap.parse_args(argv)

    from protocol.ops.logs import quiet_third_party

    quiet_third_party()  # before transformers is imported: it reads the settings at import

    preset = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    # Delta files (up to ~600 MB) go to a scratch folder removed at exit, not next to results.
    with tempfile.TemporaryDirectory(prefix="moesaic-bench-") as work:
        return _run(args, preset, Path(work))


def _run(args, preset: Preset, work: Path) -> int:
    import torch

    t0 = time.perf_counter()

    def log(what: str):
        print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)

    base = resolve_base(args, preset, args.out)
    ctx = Context(base, preset, work)
    log(f"base {base}: {ctx.assignment.num_selected()} experts selected")
    ref_delta, _ = ctx.train(preset.steps, seed=0)
    ref_losses = ctx.losses(ref_delta)
    log(f"reference delta: math loss {ctx.base_domain:.4f} -> {ref_losses[0]:.4f}")
    q30 = Q30(preset.q30_sample_experts)
    res: dict = {
        "preset": "quick" if args.quick else "full",
        "preset_values": asdict(preset),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "gpu": None,
        },
        "base": {"dir": _shown(base), "preset": "given" if args.base else preset.base_preset},
    }
    res["communication"], sample = communication(ctx, ref_delta, q30)
    log("communication")
    res["compression"] = compression(ctx, ref_delta, ref_losses, q30, sample)
    del sample
    log(f"compression: recommended {res['compression']['recommended']}")
    res["miner"] = miner(ctx, q30)
    log("miner")
    pick = res["compression"]["recommended"]["scheme"]
    other = {pick: ctx.write(f"validator-{pick}.safetensors", ref_delta, pick)}
    res["validator"] = validator(ctx, work / "demo-float32.safetensors", other)
    log("validator")
    res["merge"] = merge(ctx, q30)
    log("merge")
    res["devnet"] = devnet(args.devnet_summary)
    res["targets"] = targets(res)
    res["seconds"] = time.perf_counter() - t0
    (args.out / "bench.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "bench.md").write_text(render_md(res))
    for t in res["targets"]:
        print(f"{t['target']:<62} {t['measured']:10.3g} (want {t['op']} {t['wanted']:g})")
    log(f"wrote {args.out / 'bench.json'} and bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
