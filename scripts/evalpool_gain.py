"""Training on the evaluation pool, measured: honest miners against `evalpool` miners (who
train on the domain's packaged test split), scored on the public pool and on private held-out.

Run:  python scripts/evalpool_gain.py [--seeds 8] [--steps 32] [--batch-size 16] [--base DIR]
                                      [--json PATH]

For each seed, one honest delta (the train split of corpus:math) and one evalpool delta (the
test split first, then train; the same steps, batch size, learning rate and pool size) are
trained on the `test` preset base with the settings of tests/integration/test_cheats.py's
evalpool test, then measured on two eval sets drawn with the same seed: the PUBLIC pool (the
test split, what validators without `heldout` use) and PRIVATE held-out text (the val split written to a jsonl file, standing in for a
validator's own text: neither miner reads the val split). Gain = mean over batches of base loss
minus delta loss (nats/batch); `lcb` is the validator's score (the paired lower bound);
"advantage" is evalpool's gain over honest's, paired over the same batches, with its standard
error. The figures of docs/security.md ("training on the evaluation pool") come from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file  # our own files here: trusted
from transformers import AutoTokenizer

from miner.local import LocalJob, run_local
from miner.strategies import EVALPOOL_SPLITS
from moesaic.cli import main
from protocol.moe.data import ALL, write_docs
from protocol.moe.evaluate import Evaluator, build_eval_set, eval_seed
from protocol.moe.model import expert_layout, load_model
from protocol.round.scoring import paired_stats
from protocol.settings import EvalSettings, TrainSettings

DOMAIN, GENERAL = "corpus:math", ["corpus:prose", "corpus:code"]
# 32 steps of 16 sequences: at test_cheats' 16 x 4 one run's data order moves the gain by more
# than the evaluation pool does (public -7 %..+70 % over seeds), so no single seed is telling.
TRAIN = TrainSettings(steps=32, lr=1e-2, batch_size=16, seq_len=64, max_tokens=20_000)
TRAIN = dataclasses.replace(TRAIN, device="cpu")
EVAL = EvalSettings(domain_batches=24, general_batches=24, seq_len=64, batch_size=4)
EVAL = dataclasses.replace(EVAL, max_tokens=20_000)


def prepare(work: Path, base: Path | None) -> tuple[Path, Path, str]:
    """(base, assignment, private held-out spec), built in `work` when not given."""
    if base is None:
        base = work / "base"
        assert main(["base", "build", "--preset", "test", "--out", str(base), "--quiet"]) == 0
    assignment = work / "math.json"
    args = ["experts", "select", "--model", str(base), "--data", DOMAIN, "--method"]
    args += ["token-ratio", "--p", "0.3", "--tokens", "8192", "--seq-len", "64"]
    assert main([*args, "--out", str(assignment), "--quiet"]) == 0
    heldout = work / "heldout" / "math.jsonl"
    write_docs(DOMAIN, "val", heldout)
    return base, assignment, f"jsonl:{heldout}"


def measure(base: Path, assignment: Path, heldout: str, seed: int, train: TrainSettings, work):
    """One seed: {pool: {miner: (gain, lcb)}, pool + "_advantage": (mean, stderr)}."""
    deltas = {}
    for name, splits in (("honest", ("train",)), ("evalpool", EVALPOOL_SPLITS)):
        out = work / f"{name}-{seed}.safetensors"
        job = LocalJob(
            str(base), str(assignment), DOMAIN, str(out), dataclasses.replace(train, seed=seed)
        )
        run_local(job, progress=False, splits=splits)
        deltas[name] = out
    model = load_model(base, device="cpu")
    layout, tokenizer = expert_layout(model), AutoTokenizer.from_pretrained(base)
    es = eval_seed(f"{seed:064x}", 1, 0)
    row = {"seed": seed}
    for pool, spec, split in (("public", DOMAIN, "test"), ("private", heldout, ALL)):
        eval_set = build_eval_set(
            tokenizer, spec, GENERAL, es, **EVAL.eval_set_sizes(), domain_split=split
        )
        evaluator = Evaluator(model, layout, eval_set)
        losses = {}
        for name, path in deltas.items():
            losses[name] = evaluator.evaluate(load_file(str(path)))[0]
            stats = paired_stats(evaluator.base_domain, losses[name], confidence=EVAL.confidence)
            row[f"{pool}_{name}"] = (stats.mean, stats.lcb)
        adv = paired_stats(losses["honest"], losses["evalpool"], confidence=EVAL.confidence)
        row[f"{pool}_advantage"] = (adv.mean, adv.stdev / math.sqrt(adv.n), adv.lcb)
    return row


def report(rows: list[dict]) -> str:
    lines = [
        "seed  pool     honest gain (lcb)     evalpool gain (lcb)   evalpool/honest  advantage +- se"
    ]
    for r in rows:
        for pool in ("public", "private"):
            (hg, hl), (eg, el) = r[f"{pool}_honest"], r[f"{pool}_evalpool"]
            am, ase, _ = r[f"{pool}_advantage"]
            lines.append(
                f"{r['seed']:>4}  {pool:<7}  {hg:.5f} ({hl:+.5f})    {eg:.5f} ({el:+.5f})    "
                f"{eg / hg - 1:+7.1%}          {am:+.5f} +- {ase:.5f}"
            )
    for pool in ("public", "private"):
        honest = [r[f"{pool}_honest"][0] for r in rows]
        cheat = [r[f"{pool}_evalpool"][0] for r in rows]
        ratios = [c / h - 1 for c, h in zip(cheat, honest, strict=True)]
        line = (
            f"{pool}: evalpool over honest {min(ratios):+.1%} .. {max(ratios):+.1%} "
            f"(mean {statistics.mean(ratios):+.1%}), ahead in {sum(r > 0 for r in ratios)} "
            f"of {len(rows)} seeds"
        )
        if len(rows) >= 2:  # the seeds as samples: training noise is in the bound
            # gain = base - loss, so paired_stats(-honest, -cheat) is cheat's gain minus honest's
            seeds = paired_stats([-g for g in honest], [-g for g in cheat])
            line += f"; advantage {seeds.mean:+.5f}, lower bound {seeds.lcb:+.5f} nats/batch"
        lines.append(line)
    return "\n".join(lines)


def main_(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=TRAIN.batch_size)
    p.add_argument("--steps", type=int, default=TRAIN.steps)
    p.add_argument("--base", type=Path, default=None, help="a built test-preset base")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    train = dataclasses.replace(TRAIN, steps=args.steps, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, assignment, heldout = prepare(work, args.base)
        rows = []
        for seed in range(args.seeds):
            rows.append(measure(base, assignment, heldout, seed, train, work))
            print(report(rows[-1:]).splitlines()[1:3], file=sys.stderr)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
