"""Training throughput and memory of each fine-tuning method, same model, same batches.

Run:  python scripts/bench_train.py --base DIR [--steps 20] [--batch-size 8] [--seq-len 128]
                                    [--repeat 3] [--loss-chunk N] [--no-lora]

Each method trains `steps` timed steps after 3 warm-up steps on identical random-token batches,
once without and once with activation checkpointing (the same setting on every method of a
row group, so the ratios compare like with like); `--loss-chunk N` adds the two settings again
with the chunked LM loss. The table prints tokens/s and training memory (weights + grads +
AdamW state + saved activations, as in the quality table) and their ratios to full fine-tuning
under the same setting. Every measurement is repeated `--repeat` times, interleaved, and the
best tokens/s is kept: the numbers are wall-clock, so run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _batches(vocab: int, batch_size: int, seq_len: int):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch_size, seq_len), generator=g)


def _measure(model, params, args, step_context=None, *, memory=True, **options):
    """(tokens/s, train memory MiB or None) of `steps` timed steps under TrainSettings
    `options` (the memory options: gradient_checkpointing, loss_chunk)."""
    from protocol.moe.train import TrainConfig, train_loop
    from protocol.settings import TrainSettings
    from scripts.quality_table import train_memory_mib

    batches = _batches(model.config.vocab_size, args.batch_size, args.seq_len)
    cfg = TrainConfig(TrainSettings(steps=args.steps + 3, lr=1e-4, **options), warmup=1)
    mem = train_memory_mib(model, params, next(batches), step_context, cfg) if memory else None
    warm = train_loop(
        model,
        params,
        batches,
        TrainConfig(TrainSettings(steps=3, lr=1e-4, **options), warmup=1),
        progress=False,
        step_context=step_context,
    )
    del warm
    r = train_loop(
        model, params, batches, cfg, progress=False, step_context=step_context, start_step=3
    )
    return r.tokens_per_s, mem


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--p", type=float, default=0.2, help="token-ratio threshold for TEFT")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per cell; best is kept")
    ap.add_argument(
        "--loss-chunk", type=int, default=0, help="also measure the chunked LM loss (tokens)"
    )
    ap.add_argument("--no-lora", action="store_true", help="full fine-tuning and TEFT only")
    args = ap.parse_args(argv)

    from protocol.ops.logs import quiet_third_party

    quiet_third_party()  # before transformers is imported: it reads the settings at import

    from peft import LoraConfig, get_peft_model

    from miner.teft import ExpertTrainer
    from protocol.moe.model import expert_layout, load_model
    from protocol.moe.selection import select_experts

    def fresh():
        return load_model(args.base, experts_implementation="grouped_mm")

    a = select_experts(args.base, "corpus:math", p=args.p, tokens=1 << 15, seq_len=args.seq_len)

    def full():
        m = fresh()
        return m, list(m.parameters()), None

    def lora():
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        m = get_peft_model(fresh(), cfg)
        return m, [p for p in m.parameters() if p.requires_grad], None

    def teft():
        m = fresh()
        trainer = ExpertTrainer(m, expert_layout(m), a)
        return m, trainer.attach(), trainer.step_context

    methods = [("full", full)]
    if not args.no_lora:
        methods.append(("lora r=8", lora))
    methods.append((f"teft ({a.num_selected()} experts)", teft))
    settings = [("-", {}), ("checkpointing", {"gradient_checkpointing": True})]
    if args.loss_chunk:
        chunk = {"loss_chunk": args.loss_chunk}
        settings += [
            (f"loss chunk {args.loss_chunk}", chunk),
            (f"checkpointing, loss chunk {args.loss_chunk}", {"gradient_checkpointing": True, **chunk}),
        ]  # fmt: skip

    best: dict[tuple[str, str], float] = {}
    memory: dict[tuple[str, str], float] = {}
    for rep in range(args.repeat):
        for setting, options in settings:
            for name, build in methods:
                model, params, ctx = build()
                tps, mem = _measure(model, params, args, ctx, memory=rep == 0, **options)
                del model, params, ctx
                key = (setting, name)
                best[key] = max(best.get(key, 0.0), tps)
                if mem is not None:
                    memory[key] = mem

    print(
        "| setting | method | tokens/s | x full | train memory MiB | x full |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    for setting, _ in settings:
        full_tps, full_mem = best[(setting, "full")], memory[(setting, "full")]
        for name, _ in methods:
            tps, mem = best[(setting, name)], memory[(setting, name)]
            print(
                f"| {setting} | {name} | {tps:,.0f} | {tps / full_tps:.2f} | {mem:.1f} "
                f"| {mem / full_mem:.2f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
