"""Training throughput and memory of each fine-tuning method, same model, same batches.

Run:  python scripts/bench_train.py --base DIR [--steps 20] [--batch-size 8] [--seq-len 128]

Each method trains `steps` timed steps after 3 warm-up steps on identical random-token batches;
the table prints tokens/s and training memory (weights + grads + AdamW state + saved
activations, as in the quality table) and their ratios to full fine-tuning. Run it on a quiet
machine: the numbers are wall-clock.
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


def _measure(model, params, args, step_context=None) -> tuple[float, float]:
    from protocol.train import TrainConfig, train_loop
    from scripts.quality_table import train_memory_mib

    batches = _batches(model.config.vocab_size, args.batch_size, args.seq_len)
    mem = train_memory_mib(model, params, next(batches), step_context)
    cfg = TrainConfig(steps=args.steps + 3, lr=1e-4, warmup=1)
    warm = train_loop(
        model,
        params,
        batches,
        TrainConfig(steps=3, lr=1e-4, warmup=1),
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
    args = ap.parse_args(argv)

    from protocol.logs import quiet_third_party

    quiet_third_party()  # before transformers is imported: it reads the settings at import

    from peft import LoraConfig, get_peft_model

    from miner.teft import ExpertTrainer
    from protocol.model import expert_layout, load_model
    from protocol.selection import select_experts

    def fresh():
        return load_model(args.base, experts_implementation="grouped_mm")

    a = select_experts(args.base, "corpus:math", p=args.p, tokens=1 << 15, seq_len=args.seq_len)
    rows = []
    m = fresh()
    rows.append(("full", *_measure(m, list(m.parameters()), args)))
    lora_cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    m = get_peft_model(fresh(), lora_cfg)
    rows.append(("lora r=8", *_measure(m, [p for p in m.parameters() if p.requires_grad], args)))
    m = fresh()
    trainer = ExpertTrainer(m, expert_layout(m), a)
    params = trainer.attach()
    rows.append(
        (f"teft ({a.num_selected()} experts)", *_measure(m, params, args, trainer.step_context))
    )
    full_tps, full_mem = rows[0][1], rows[0][2]
    print("| method | tokens/s | x full | train memory MiB | x full |\n|---|---:|---:|---:|---:|")
    for name, tps, mem in rows:
        print(f"| {name} | {tps:,.0f} | {tps / full_tps:.2f} | {mem:.1f} | {mem / full_mem:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
