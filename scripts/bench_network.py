"""Network scaling benchmark: does a network of N miners make a better model than one miner?

Run:  python scripts/bench_network.py [--quick] [--arms NAME,...] [--seeds 1] [--jobs 1]
                                      [--out-dir runs/bench-network] [--json PATH] [--png PATH]

Every arm starts from the same base and runs `--rounds` rounds. In a network arm each of N
miners trains the domain's selected experts on its own shard of the math train split (the
shard key `protocol.round.shards.shard_key(task, hotkey, round)` as the order key of
`load_blocks`, a budget of steps * batch * seq_len tokens, so no token is seen twice) with the
miner's trainer (`miner.teft.train_experts`, `TrainConfig.for_job` as `miner.local.run_local`);
each delta is scored as a validator scores it (`Evaluator`, `paired_stats`, `score_submission`
on this round's scoring batches); the deltas that scored above zero are merged by the arm's
rule (`protocol.moe.merge`) and the update is added into the checkpoint. Chain and store are
left out. Centralized arms train one trainer on all N shards' tokens (N x the batch, or N x the
steps), on the same experts or on all weights (full fine-tuning). After every round the
checkpoint is measured on ONE fixed held-out set (math test batches; prose + code test batches
for the general drift), drawn from other test blocks than the scoring batches, against the
original base, so the curves read across rounds.

Merge rules: `avg` consensus-weighted average (outer lr 1); `diloco` DiLoCoOuter (Nesterov)
over that average; `sum` the average times the number of accepted deltas (updates add);
`agree` the average times 1 + (k - 1) * rho, rho the mean pairwise cosine of the accepted
deltas (an outer step that grows with the contributors' agreement); `partition` each miner
trains a disjoint share of the experts and the deltas are composed (`compose`). `keep_opt`
miners keep their AdamW state across rounds; the roles lack that, so it is implemented here
(`train_keeping_state`: the same ExpertTrainer and train_loop, with the optimizer passed in).

Outputs: a per-arm cache under --out-dir/arms (a rerun skips arms already measured with the
same settings), the results JSON (curves, summary, targets), a PNG plot and a markdown table
on stdout. `--quick` is the CI smoke run: the `test` preset base, 2 rounds of 4 steps, a few
arms. docs/network.md holds the reading of a full run. Longer than ~500 lines only by the arm
catalogue and the report; the measurement itself is `run_arm`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOMAIN, GENERAL = "corpus:math", ("corpus:prose", "corpus:code")
TASK_ID = 1
DRIFT_BUDGETS = (0.1, 0.15, 0.25, 0.4)


@dataclass(frozen=True)
class Arm:
    """One line of the study: who trains what, and how the round's deltas become an update."""

    name: str
    kind: str = "network"  # network | central (same experts) | full (all weights)
    n: int = 1  # miners, or shards a central trainer reads
    rule: str = "avg"  # network: avg | diloco | sum | agree | partition
    lr: float = 2e-4
    outer_lr: float = 1.0
    momentum: float = 0.0
    keep_opt: bool = False
    scale: str = "steps"  # central: N x the "steps" or N x the "batch"
    note: str = ""


def catalogue() -> dict[str, Arm]:
    """Every arm the full study knows, by name."""
    arms = [
        Arm("solo", note="1 miner, its delta applied each round"),
        Arm("solo-lr1e-3", lr=1e-3, note="1 miner at lr 1e-3"),
        Arm(
            "solo-diloco",
            rule="diloco",
            outer_lr=0.7,
            momentum=0.9,
            note="1 miner, outer Nesterov 0.7/0.9",
        ),
        Arm("solo-keep", keep_opt=True, note="1 miner keeping its AdamW state"),
    ]
    for n in (2, 4, 8):
        arms += [
            Arm(f"avg-{n}", n=n, note=f"{n} miners, consensus-weighted average"),
            Arm(
                f"diloco-{n}",
                n=n,
                rule="diloco",
                outer_lr=0.7,
                momentum=0.9,
                note="outer Nesterov 0.7/0.9",
            ),
            Arm(f"sum-{n}", n=n, rule="sum", note="sum of accepted deltas (outer lr = k)"),
            Arm(f"agree-{n}", n=n, rule="agree", note="average x (1 + (k-1) mean cosine)"),
            Arm(f"scaled-{n}", n=n, rule="scaled", note="average x sqrt(N_eff): the merger's"),
            Arm(
                f"partition-{n}", n=n, rule="partition", note="experts split among miners, composed"
            ),
            Arm(f"avg-keep-{n}", n=n, keep_opt=True, note="average, miners keep AdamW state"),
            Arm(f"central-steps-{n}", kind="central", n=n, note=f"one trainer, {n}x the steps"),
            Arm(
                f"central-batch-{n}",
                kind="central",
                n=n,
                scale="batch",
                note=f"one trainer, {n}x the batch",
            ),
            Arm(f"full-steps-{n}", kind="full", n=n, note=f"full fine-tuning, {n}x the steps"),
        ]
    arms += [
        Arm("diloco-4-lr1", n=4, rule="diloco", outer_lr=1.0, momentum=0.9, note="outer lr 1.0"),
        Arm("sum-keep-4", n=4, rule="sum", keep_opt=True, note="sum, miners keep AdamW state"),
        Arm("partition-keep-4", n=4, rule="partition", keep_opt=True, note="partition, keep AdamW"),
    ]
    return {a.name: a for a in arms}


FULL_ARMS = (  # in order of priority: with --jobs, the first ones finish first
    "solo,avg-4,scaled-4,sum-4,diloco-4,central-steps-4,partition-4,solo-lr1e-3,central-batch-4,"
    "agree-4,"
    "avg-keep-4,full-steps-4,solo-diloco,avg-2,sum-2,avg-8,sum-8,partition-2,partition-8,solo-keep"
)
QUICK_ARMS = "solo,avg-2,diloco-2,agree-2,partition-2,avg-keep-2,central-steps-2,full-steps-2"


@dataclass(frozen=True)
class Setup:
    """What every arm shares: base, assignment, round shape and the held-out batches' sizes."""

    base: str
    assignment: str
    rounds: int = 8
    steps: int = 32
    batch_size: int = 4
    seq_len: int = 128
    fixed_batches: int = 12  # per side (domain, general) of the fixed report set
    score_batches: int = 6  # per side of a round's scoring batches
    eval_tokens: int = 200_000
    general_tolerance: float = 0.05
    min_improvement: float = 5e-4
    lr_mult: float = 1.0  # every arm's inner lr times this (the quick run's few steps need more)


# ----------------------------------------------------------------------------- pure rules


def partition(assignment, n: int) -> list:
    """The assignment's (layer, expert) pairs dealt round-robin to n disjoint assignments."""
    pairs = assignment.pairs()
    if n > len(pairs):
        raise ValueError(f"cannot split {len(pairs)} experts among {n} miners")
    parts = []
    for i in range(n):
        layers: dict[int, list[int]] = {}
        for layer, e in pairs[i::n]:
            layers.setdefault(layer, []).append(e)
        body = {k: tuple(sorted(v)) for k, v in layers.items()}
        # replace() runs __post_init__: each part is validated like any assignment.
        parts.append(dataclasses.replace(assignment, layers=body, info={}))
    return parts


def rounds_to(curve: list[float], target: float) -> int | None:
    """First round (1-based) whose loss is at or below target; None if never."""
    return next((r for r, x in enumerate(curve[1:], start=1) if x <= target + 1e-9), None)


def loss_at_drift(domain: list[float], general: list[float], budget: float) -> float:
    """Lowest domain loss among rounds whose cumulative general drift stays within budget
    (round 0, the base, always does)."""
    return min(d for d, g in zip(domain, general, strict=True) if g - general[0] <= budget)


def mean_curves(runs: list[dict]) -> dict:
    """Per-round means of the seeds' domain and general curves."""
    keys = ("domain", "general")
    return {
        k: [sum(r[k][i] for r in runs) / len(runs) for i in range(len(runs[0][k]))] for k in keys
    }


def _gain_at(curve: dict, budget: float) -> float:
    """Domain gain over the base at the best round whose cumulative drift is within budget."""
    return curve["domain"][0] - loss_at_drift(curve["domain"], curve["general"], budget)


def summarize(results: dict[str, list[dict]], n_ref: int = 4) -> dict:
    """Per-arm gain, drift, rounds to the solo line's final loss, loss at drift budgets, share
    of the centralized references' gain (arms with n == n_ref); the targets' verdicts."""
    curves = {name: mean_curves(runs) for name, runs in results.items() if runs}
    out: dict = {"arms": {}, "targets": {}}
    target = curves["solo"]["domain"][-1] if "solo" in curves else None
    gains = {k: c["domain"][0] - c["domain"][-1] for k, c in curves.items()}
    for name, c in curves.items():
        row = {
            "gain": gains[name],
            "drift": c["general"][-1] - c["general"][0],
            "final_domain": c["domain"][-1],
            "rounds_to_solo": None if target is None else rounds_to(c["domain"], target),
            "loss_at_drift": {
                str(b): loss_at_drift(c["domain"], c["general"], b) for b in DRIFT_BUDGETS
            },
        }
        for ref in (f"central-steps-{n_ref}", f"central-batch-{n_ref}", f"full-steps-{n_ref}"):
            if ref in gains and gains[ref] > 0:
                row[f"share_of_{ref}"] = gains[name] / gains[ref]
        out["arms"][name] = row
    for name, row in out["arms"].items():
        arm = catalogue().get(name)
        if not arm or arm.kind != "network":
            continue
        # The reference with the same total tokens: one trainer reading all N shards.
        ref = f"central-steps-{arm.n}"
        if ref in curves and gains[ref] > 0:
            row["central_same_tokens"] = ref
            row["share_of_central_same_tokens"] = gains[name] / gains[ref]
            row["share_at_drift"] = {
                str(b): _gain_at(curves[name], b) / g
                for b in DRIFT_BUDGETS
                if (g := _gain_at(curves[ref], b)) > 0
            }
        if arm.n == n_ref or ref in curves:
            out["targets"][name] = {
                "a_rounds_to_solo_le_half": row["rounds_to_solo"] is not None
                and row["rounds_to_solo"] <= results[name][0]["rounds"] // 2,
                "b_share_of_central_ge_95pct": row.get("share_of_central_same_tokens", 0.0) >= 0.95,
                "b_at_drift_0.15_ge_95pct": row.get("share_at_drift", {}).get("0.15", 0.0) >= 0.95,
            }
    return out


# ----------------------------------------------------------------------------- training


def train_keeping_state(model, layout, assignment, batches, cfg, state):
    """The miner's expert training with an AdamW whose state is carried in from the last round
    (`state`, None the first time); returns (delta, the optimizer's state for the next)."""
    import torch  # noqa: PLC0415 (torch is heavy; --help stays fast)

    from miner.teft import ExpertTrainer  # noqa: PLC0415
    from protocol.moe.train import train_loop  # noqa: PLC0415

    trainer = ExpertTrainer(model, layout, assignment)
    params = trainer.attach()
    try:
        s = cfg.settings
        opt = torch.optim.AdamW(
            params, lr=s.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
        )
        if state is not None:
            opt.load_state_dict(state)
        train_loop(model, params, batches, cfg, optimizer=opt, progress=False)
        return trainer.delta(), copy.deepcopy(opt.state_dict())
    finally:
        trainer.detach(keep=False)


def cosine_agreement(deltas: list[dict]) -> float:
    """Mean pairwise cosine of flattened deltas (0 for fewer than two)."""
    import torch  # noqa: PLC0415

    from protocol.artifact.delta import flatten  # noqa: PLC0415

    if len(deltas) < 2:
        return 0.0
    flat = [flatten(d) for d in deltas]
    cos = [
        float(torch.nn.functional.cosine_similarity(flat[i], flat[j], dim=0))
        for i in range(len(flat))
        for j in range(i + 1, len(flat))
    ]
    return sum(cos) / len(cos)


_MEMO: dict = {}


def memo(key, make):
    """Token blocks by key, computed once per process."""
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


class ArmRun:
    """One arm, one seed, on its own copy of the base: the model IS the current checkpoint
    (each round's update is added into it), measured after every round on the fixed set."""

    def __init__(self, arm: Arm, setup: Setup, seed: int):
        import torch  # noqa: PLC0415 (torch is heavy; --help stays fast)
        from transformers import AutoTokenizer  # noqa: PLC0415

        from protocol.moe.data import load_blocks, sample_batches  # noqa: PLC0415
        from protocol.moe.evaluate import EvalSet  # noqa: PLC0415
        from protocol.moe.experts import Assignment  # noqa: PLC0415
        from protocol.moe.merge import DiLoCoOuter  # noqa: PLC0415
        from protocol.moe.model import expert_layout, load_model  # noqa: PLC0415

        torch.set_num_threads(1)
        self.arm, self.setup, self.seed = arm, setup, seed
        self.model = load_model(setup.base, device="cpu", experts_implementation="grouped_mm")
        self.layout, self.tok = expert_layout(self.model), AutoTokenizer.from_pretrained(setup.base)
        self.assignment = Assignment.load(setup.assignment)
        n = arm.n
        self.parts = (
            partition(self.assignment, n) if arm.rule == "partition" else [self.assignment] * n
        )
        self.budget = setup.steps * setup.batch_size * setup.seq_len

        # The fixed report set and the rounds' scoring batches come from disjoint halves of
        # the test blocks, so no reported loss is measured on batches that chose a merge.
        def halves(spec):
            make = lambda: load_blocks(spec, "test", self.tok, setup.seq_len, setup.eval_tokens)  # noqa: E731
            b = memo(("test", setup.base, spec, setup.eval_tokens), make)
            return b[0::2], b[1::2]

        dom, gens = halves(DOMAIN), [halves(s) for s in GENERAL]
        gen = (torch.cat([g[0] for g in gens]), torch.cat([g[1] for g in gens]))
        self.score_pool = (dom[1], gen[1])
        fixed = [sample_batches(b[0], setup.batch_size, setup.fixed_batches, 0) for b in (dom, gen)]
        self.fixed = EvalSet(0, tuple(fixed[0]), tuple(fixed[1]))
        self.outer = DiLoCoOuter(arm.outer_lr, arm.momentum) if arm.rule == "diloco" else None
        self.opt_states: list = [None] * n

    def measure(self) -> tuple[float, float]:
        from protocol.moe.evaluate import batch_losses  # noqa: PLC0415

        d = batch_losses(self.model, list(self.fixed.domain))
        g = batch_losses(self.model, list(self.fixed.general))
        return sum(d) / len(d), sum(g) / len(g)

    def shard(self, i: int, r: int):
        """Miner i's shard of round r: the train split in its key's order, one budget long."""
        from protocol.moe.data import load_blocks  # noqa: PLC0415
        from protocol.round.shards import shard_key  # noqa: PLC0415

        key = shard_key(TASK_ID, f"seed{self.seed}-miner{i}", r)
        s = self.setup
        make = lambda: load_blocks(DOMAIN, "train", self.tok, s.seq_len, self.budget, order_key=key)  # noqa: E731
        # Sorting the split by key costs ~0.5 s; arms in one process share the shards.
        return memo((s.base, key, self.budget), make)

    def settings(self, r: int, steps: int = 1, batch: int = 1):
        from protocol.settings import TrainSettings  # noqa: PLC0415

        s = self.setup
        return TrainSettings(
            steps=s.steps * steps,
            lr=self.arm.lr * s.lr_mult,
            batch_size=s.batch_size * batch,
            seq_len=s.seq_len,
            max_tokens=self.budget * steps * batch,
            seed=self.seed * 1000 + r,
        )

    def central_round(self, r: int) -> dict:
        """One trainer on all n shards' tokens (n x the steps or the batch), applied as is."""
        import torch  # noqa: PLC0415

        from miner.teft import train_experts  # noqa: PLC0415
        from protocol.artifact.delta import apply_delta  # noqa: PLC0415
        from protocol.moe.data import batch_stream  # noqa: PLC0415
        from protocol.moe.train import TrainConfig, train_loop  # noqa: PLC0415

        arm = self.arm
        mult = {"steps": dict(steps=arm.n), "batch": dict(batch=arm.n)}[arm.scale]
        s = self.settings(r, **mult)
        cfg = TrainConfig.for_job(s, bf16=False)
        torch.manual_seed(s.seed)
        blocks = torch.cat([self.shard(i, r) for i in range(arm.n)])
        batches = batch_stream(blocks, s.batch_size, s.seed)
        if arm.kind == "central":
            delta, _ = train_experts(
                self.model, self.layout, self.assignment, batches, cfg, progress=False
            )
            apply_delta(self.model, self.layout, delta)
        else:  # full fine-tuning: every weight, trained in place
            self.model.requires_grad_(True)
            train_loop(self.model, list(self.model.parameters()), batches, cfg, progress=False)
        return {"accepted": arm.n, "agreement": 0.0, "scores": []}

    def train_miners(self, r: int) -> list[dict]:
        import torch  # noqa: PLC0415

        from miner.teft import train_experts  # noqa: PLC0415
        from protocol.moe.data import batch_stream  # noqa: PLC0415
        from protocol.moe.train import TrainConfig  # noqa: PLC0415

        s = self.settings(r)
        cfg = TrainConfig.for_job(s, bf16=False)
        deltas = []
        for i, part in enumerate(self.parts):
            mseed = s.seed * 100 + i
            torch.manual_seed(mseed)
            batches = batch_stream(self.shard(i, r), s.batch_size, mseed)
            if self.arm.keep_opt:
                d, self.opt_states[i] = train_keeping_state(
                    self.model, self.layout, part, batches, cfg, self.opt_states[i]
                )
            else:
                d, _ = train_experts(self.model, self.layout, part, batches, cfg, progress=False)
            deltas.append(d)
        return deltas

    def score(self, r: int, deltas: list[dict]) -> list[float]:
        """Each delta's validator score on this round's scoring batches (fresh each round)."""
        import torch  # noqa: PLC0415

        from protocol.moe.data import sample_batches  # noqa: PLC0415
        from protocol.moe.evaluate import EvalSet, Evaluator  # noqa: PLC0415
        from protocol.round.scoring import paired_stats, score_submission  # noqa: PLC0415

        s, rseed = self.setup, self.seed * 1000 + r
        g = torch.Generator().manual_seed(rseed)
        seeds = [int(torch.randint(1 << 30, (1,), generator=g)) for _ in self.score_pool]
        drawn = [
            tuple(sample_batches(pool, s.batch_size, s.score_batches, sd))
            for pool, sd in zip(self.score_pool, seeds, strict=True)
        ]
        ev = Evaluator(self.model, self.layout, EvalSet(rseed, *drawn))
        scores = []
        for d in deltas:
            dl, gl = ev.evaluate(d)
            sc = score_submission(
                paired_stats(ev.base_domain, dl),
                paired_stats(ev.base_general, gl),
                general_tolerance=s.general_tolerance,
                min_improvement=s.min_improvement,
            )
            scores.append(sc.value)
        return scores

    def network_round(self, r: int) -> dict:
        """Train -> score -> merge the deltas that scored above zero -> add the update."""
        from protocol.artifact.delta import apply_delta  # noqa: PLC0415
        from protocol.moe import merge  # noqa: PLC0415

        deltas = self.train_miners(r)
        scores = self.score(r, deltas)
        keep = [i for i, x in enumerate(scores) if x > 0]
        kept, ws = [deltas[i] for i in keep], [scores[i] for i in keep]
        # Disjoint experts (partition) have nothing to agree on, and no common shape.
        rho = 0.0 if self.arm.rule == "partition" else cosine_agreement(kept)
        if kept:  # nothing scored: the checkpoint stays as it is this round
            if self.arm.rule == "partition":
                update = merge.compose(kept)
            else:
                avg = merge.weighted_average(kept, ws)
                k = len(kept)
                factor = {"avg": 1.0, "diloco": 1.0, "sum": k, "agree": 1 + (k - 1) * max(0.0, rho)}
                # the merger's default (merger.settings: method "scaled", max_scale 4)
                factor["scaled"] = merge.contributor_scale(ws, 4.0)
                scale = factor[self.arm.rule]
                update = (
                    self.outer.step(avg) if self.outer else {n: v * scale for n, v in avg.items()}
                )
            apply_delta(self.model, self.layout, update)
        return {"accepted": len(kept), "agreement": rho, "scores": scores}

    def run(self) -> dict:
        t0 = time.perf_counter()
        d0, g0 = self.measure()
        curve = {"domain": [d0], "general": [g0], "accepted": [], "agreement": [], "scores": []}
        for r in range(self.setup.rounds):
            step = self.network_round if self.arm.kind == "network" else self.central_round
            for key, value in step(r).items():
                curve[key].append(value)
            d, g = self.measure()
            curve["domain"].append(d)
            curve["general"].append(g)
        curve.update(arm=dataclasses.asdict(self.arm), seed=self.seed, rounds=self.setup.rounds)
        curve["seconds"] = time.perf_counter() - t0
        return curve


def run_arm(arm: Arm, setup: Setup, seed: int) -> dict:
    """One arm, one seed: rounds of train -> score -> merge -> apply, measured each round."""
    return ArmRun(arm, setup, seed).run()


# ----------------------------------------------------------------------------- shell


def prepare(out_dir: Path, preset: str, base: str | None, select_tokens: int) -> tuple[str, str]:
    """The base (built once and cached under out_dir unless given) and its assignment JSON
    (token ratio p=0.3 on the domain, as `moesaic experts select`)."""
    from protocol.moe.demo_base import build_base  # noqa: PLC0415
    from protocol.moe.selection import select_experts  # noqa: PLC0415

    base_dir = Path(base) if base else out_dir / f"base-{preset}"
    if not (base_dir / "config.json").exists():
        print(f"building the {preset} base in {base_dir} ...", flush=True)
        build_base(base_dir, preset=preset, progress=False)
    assignment = base_dir.parent / f"{base_dir.name}-math-p0.3.json"
    if not assignment.exists():
        a = select_experts(str(base_dir), DOMAIN, p=0.3, tokens=select_tokens, device="cpu")
        a.save(assignment)
    return str(base_dir), str(assignment)


def fingerprint(arm: Arm, setup: Setup, seed: int) -> str:
    return json.dumps([dataclasses.asdict(arm), dataclasses.asdict(setup), seed], sort_keys=True)


def run_cached(job: tuple[Arm, Setup, int, str]) -> dict:
    """run_arm, or its cached result when the same arm/setup/seed was measured before."""
    from protocol.ops.atomic import write_text_atomic  # noqa: PLC0415

    arm, setup, seed, cache_dir = job
    path = Path(cache_dir) / f"{arm.name}-s{seed}.json"
    fp = fingerprint(arm, setup, seed)
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("fingerprint") == fp:
            return cached
    result = run_arm(arm, setup, seed)
    result["fingerprint"] = fp
    write_text_atomic(path, json.dumps(result) + "\n")
    print(
        f"  {arm.name} seed {seed}: {result['seconds']:.0f} s, domain "
        f"{result['domain'][0]:.3f} -> {result['domain'][-1]:.3f}",
        flush=True,
    )
    return result


def table(summary: dict, results: dict) -> str:
    """Markdown: one row per arm, the per-round domain curve and the summary figures."""
    head = (
        "| arm | what | gain | drift | rounds to solo | loss @ drift 0.15 "
        "| share of central, same tokens (raw / @ drift 0.15) | domain loss per round |"
    )
    rows = [head, "|" + "---|" * 8]
    for name, row in summary["arms"].items():
        c = mean_curves(results[name])
        raw, at = row.get("share_of_central_same_tokens"), row.get("share_at_drift", {}).get("0.15")
        share = "-" if raw is None else f"{raw:.0%} / {'-' if at is None else f'{at:.0%}'}"
        rows.append(
            f"| {name} | {results[name][0]['arm']['note']} | {row['gain']:.3f} | {row['drift']:.3f} | "
            f"{row['rounds_to_solo'] if row['rounds_to_solo'] is not None else '-'} | "
            f"{row['loss_at_drift']['0.15']:.3f} | {share} | "
            + " ".join(f"{x:.3f}" for x in c["domain"])
            + " |"
        )
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    """Domain loss per round, and domain loss against general drift (the frontier)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.5))
    for name, runs in results.items():
        c = mean_curves(runs)
        kind = runs[0]["arm"]["kind"]
        style = "--" if kind != "network" else "-"
        drift = [x - c["general"][0] for x in c["general"]]
        a.plot(range(len(c["domain"])), c["domain"], style, marker=".", label=name)
        b.plot(drift, c["domain"], style, marker=".", label=name)
    a.set(
        xlabel="round", ylabel="math loss, fixed held-out set (nats)", title="domain loss per round"
    )
    b.set(
        xlabel="cumulative general drift (nats)",
        ylabel="math loss (nats)",
        title="gain against general drift",
    )
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="CI smoke run: test base, 2 rounds of 4 steps"
    )
    p.add_argument(
        "--arms",
        help=f"comma-separated arm names (default: the full study; known: {', '.join(catalogue())})",
    )
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--rounds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--jobs", type=int, default=1, help="arms measured in parallel processes")
    p.add_argument("--base", help="base model directory (default: built once under --out-dir)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "bench-network"))
    p.add_argument("--json", help="results JSON (default: <out-dir>/network.json)")
    p.add_argument("--png", help="plot (default: <out-dir>/network.png)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    (out_dir / "arms").mkdir(parents=True, exist_ok=True)
    preset = "test" if args.quick else "tiny"
    base, assignment = prepare(out_dir, preset, args.base, 16_384 if args.quick else 131_072)
    shape = (
        dict(rounds=2, steps=4, fixed_batches=4, score_batches=4, eval_tokens=20_000, lr_mult=20.0)
        if args.quick
        else {}
    )
    shape.update({k: v for k, v in (("rounds", args.rounds), ("steps", args.steps)) if v})
    setup = Setup(base, assignment, **shape)
    names = (args.arms or (QUICK_ARMS if args.quick else FULL_ARMS)).split(",")
    known = catalogue()
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; known: {', '.join(known)}")
    if "solo" not in names:
        names.insert(0, "solo")  # the target line every other arm is read against
    jobs = [(known[n], setup, s, str(out_dir / "arms")) for n in names for s in range(args.seeds)]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            done = list(pool.map(run_cached, jobs))
    else:
        done = [run_cached(j) for j in jobs]
    results: dict[str, list[dict]] = {}
    for (arm, *_), res in zip(jobs, done, strict=True):
        results.setdefault(arm.name, []).append(res)
    summary = summarize(results, n_ref=2 if args.quick else 4)
    report = {
        "setup": dataclasses.asdict(setup),
        "seeds": args.seeds,
        "seconds": time.perf_counter() - t0,
        "summary": summary,
        "curves": {
            k: [
                {
                    x: r[x]
                    for x in ("domain", "general", "accepted", "agreement", "scores", "seconds")
                }
                for r in v
            ]
            for k, v in results.items()
        },
        "arms": {k: v[0]["arm"] for k, v in results.items()},
    }
    from protocol.ops.atomic import write_text_atomic  # noqa: PLC0415

    write_text_atomic(args.json or out_dir / "network.json", json.dumps(report, indent=1) + "\n")
    plot(results, Path(args.png or out_dir / "network.png"))
    print(table(summary, results))
    print(json.dumps(summary["targets"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
