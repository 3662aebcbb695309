"""The merger's round as named steps: collect -> fetch -> merge -> publish.

    ctx = RoleContext(chain, store, schedule=chain.schedule(), chain_label=chain.label(),
                      task_id=0, base_dir="runs/base", assignment_path="runs/math.json")
    merger = Merger(ctx, domain_spec="corpus:math", general_specs=["corpus:prose"],
                    state_dir="runs/merger", settings=MergerSettings())
    merger.run_round(r, wait=block_waiter(chain))      # protocol.round.runtime: in its merge phase
    merger.current_base()                              # the checkpoint the next round builds on

collect reads the validators' weights for the round (final once the merge phase starts),
combines them robustly (each miner's weight clipped at the standing-weighted median of the
validators', protocol.round.consensus), updates each validator's standing by its agreement and
keeps the miners with a positive consensus weight; fetch gets their deltas under the same
rules as validators (protocol.round.submissions). merge measures every delta alone on the
round's selection batches (the validators' eval set) and drops those the validators' scoring
rule does not pay THIS round (merger.core.split_by_score), whatever the moving averages say;
it averages the rest by consensus weight (or takes a DiLoCo outer step from the state the
round's base checkpoint carries, merger.outer) and picks the best single there. The GUARD then
measures the merge and that single on a second, disjoint batch set (merger.core.guard_seed) and
decides on those numbers alone: the merge if it beats the base and the single and passes the
general checks, else the single if it does, else the previous checkpoint is kept. publish
exports base + chosen delta with the merge state (protocol.artifact.merge_state) and a model
card (merger.card), uploads it and records it on chain once.

Like the validator, each step writes its record into `state_dir/rounds/<r>.json` (atomically)
and a step whose record exists returns it, so a merger killed anywhere finishes the round with
the same result. State directory:
    rounds/<r>.json                           one record per finished step (JSON)
    artifacts/<r>/<hotkey>.{manifest.json,safetensors}   fetched and verified submissions
    chosen/<r>.safetensors                    the delta the guard chose (base + it = checkpoint)
    outer/<r>.safetensors                     DiLoCo outer state after round r's step (a copy;
                                              the checkpoint's merge state is authoritative)
    checkpoints/<r>/                          the exported HF checkpoint, README.md (model card)
                                              and moesaic-merge-state.safetensors included

Length: past 500 lines because each step's body reads the chain, store and round record
together; the pure rules are in merger/core.py, measuring in measure.py, publishing in publish.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from safetensors.torch import save
from transformers import AutoTokenizer

from merger.core import (  # noqa: F401 (re-exported: callers import the role's names here)
    BEST_SINGLE,
    COMPOSED,
    KEPT_PREVIOUS,
    MERGED,
    OTHER_TASK_CODES,
    TaskSpec,
    best_single,
    check_disjoint,
    deltas_digest,
    general_problem,
    guard,
    guard_seed,
    kept_record,
    split_by_score,
    validator_consensus,
)
from merger.measure import Reader, mean, measure
from merger.outer import outer_before
from merger.publish import export_round
from merger.settings import METHODS, MergerSettings  # noqa: F401 (METHODS re-exported)
from protocol.artifact.checkpoint import publish_dir
from protocol.artifact.delta import max_delta_bytes
from protocol.chain import ChainError, Commitment
from protocol.identity.hashing import sha256_dir
from protocol.identity.keys import normalise
from protocol.moe.evaluate import Evaluator, build_eval_set, eval_seed
from protocol.moe.experts import Assignment
from protocol.moe.merge import compose, contributor_scale, scaled, streamed_average
from protocol.moe.model import config_layout, expert_layout, load_model
from protocol.ops.atomic import write_bytes_atomic
from protocol.round.context import RoleContext
from protocol.round.drift import original_general_losses
from protocol.round.lineage import base_record, recorded_base
from protocol.round.schedule import commit_deadline, phase_bounds
from protocol.round.state import RoundError, RoundStore, round_step
from protocol.round.submissions import Expectations, Rejected, fetch_submission

Wait = Callable[[int], None]  # returns once chain.block() >= the block given


# ----------------------------------------------------------------------------- the role


class Merger:
    """One merger key's rounds; chain, store and base come in the RoleContext, data here."""

    def __init__(
        self,
        ctx: RoleContext,
        *,
        domain_spec: str,
        general_specs: Sequence[str],
        state_dir: str | Path,
        settings: MergerSettings,
        compose: Sequence[tuple[int, str | Path, str]] = (),
    ):
        if not isinstance(settings, MergerSettings):
            raise ValueError(f"settings must be MergerSettings, got {settings!r}")
        if isinstance(general_specs, str) or not general_specs:
            raise ValueError("general_specs: give a list of at least one spec (the guard)")
        self.chain, self.store, self.schedule = ctx.chain, ctx.store, ctx.schedule
        self.settings, self.chain_label, self.task_id = settings, ctx.chain_label, ctx.task_id
        self.domain_spec, self.general_specs = domain_spec, list(general_specs)
        self.base_dir, self.state_dir = ctx.base_dir, Path(state_dir)
        self.rounds = RoundStore(self.state_dir)
        try:
            self.base_hash = sha256_dir(self.base_dir)
            self.assignment = Assignment.load(ctx.assignment_path)
        except FileNotFoundError as e:
            raise ValueError(f"base or assignment missing: {e}") from None
        self.tasks = [TaskSpec(ctx.task_id, self.assignment, domain_spec)]
        self.tasks += [_task_spec(t, self.base_hash) for t in compose]
        check_disjoint(self.tasks)
        if len(self.tasks) > 1 and settings.method == "diloco":
            raise ValueError("composing several tasks supports methods 'scaled' and 'average' only")
        (self.state_dir / "rounds").mkdir(parents=True, exist_ok=True)
        # With a lineage, round r merges onto the checkpoint it builds on (protocol.round.lineage).
        self.lineage = ctx.lineage
        self._base, self._base_loaded_from = None, None

    def run_round(self, r: int, wait: Wait) -> dict:
        """The whole round; safe to call again after a crash. Returns the round's record."""
        wait(phase_bounds(self.schedule, r, "merge")[0])
        self.collect(r)
        self.fetch(r)
        self.merge(r)
        self.publish(r)
        return self.rounds.load(r)

    @round_step("collect")
    def collect(self, r: int, state: dict) -> dict:
        """Accepted miners (consensus weight > 0) with their commitment for round r.

        Refused before the merge phase: until the weights phase is over validators may still
        add weights, and a merge of a partial vote would differ from one of the final vote.
        """
        start, now = phase_bounds(self.schedule, r, "merge")[0], self.chain.block()
        if now < start:
            raise RoundError(f"round {r}: the merge phase starts at block {start}, chain at {now}")
        members = self.chain.members()
        consensus, validators, standing = validator_consensus(
            self.chain.weights(r), members, self._standing_before(r), self.settings.standing_alpha
        )
        by_uid = {m.uid: m.hotkey for m in members}
        deadline = commit_deadline(self.schedule, r)
        first: dict[str, Commitment] = {}
        for c in sorted(self.chain.commitments(r), key=lambda c: c.block):
            if c.round == r and c.block <= deadline:  # the earliest one counts, as validators
                first.setdefault(normalise(c.hotkey), c)
        accepted, skipped = [], {}
        for uid, weight in consensus.items():
            hotkey = by_uid.get(uid)
            c = first.get(normalise(hotkey)) if hotkey else None
            if c is None:
                skipped[str(uid)] = "no registered hotkey" if hotkey is None else "no commitment"
                continue
            accepted.append(
                dict(uid=uid, hotkey=hotkey, weight=weight, digest=c.digest.lower(), block=c.block)
            )
        return {
            "deadline": deadline,
            "block_hash": self.chain.block_hash(deadline),
            "consensus": {str(u): w for u, w in consensus.items()},
            "validators": validators,  # each permitted validator's standing and agreement
            "standing": standing,  # carried to the next round (_standing_before)
            "accepted": accepted,
            "skipped": skipped,
            "base": base_record(self.lineage, r, self.base_dir, self.base_hash),
        }

    @round_step("fetch", after="collect")
    def fetch(self, r: int, state: dict) -> dict:
        """The accepted miners' deltas, under the validators' rules (protocol.round.submissions);
        with several tasks, each under the rules of the task its manifest names."""
        registered = [m.hotkey for m in self.chain.members()]
        fetched, rejected = {}, {}
        if state["collect"]["accepted"]:  # the most bytes a delta may have, per task
            layout = config_layout(str(self._round_base(state)[0]))
            cap = self.settings.evaluation.max_artifact_bytes
            caps = [min(max_delta_bytes(layout, t.assignment), cap) for t in self.tasks]
        for a in state["collect"]["accepted"]:
            commitment = Commitment(a["hotkey"], r, a["digest"], a["block"])
            for i, task in enumerate(self.tasks):
                expect = Expectations(
                    chain=self.chain_label,
                    task_id=task.task_id,
                    base_hash=self._round_base(state)[1],
                    assignment_hash=task.assignment.hash(),
                    registered_hotkeys=registered,
                    deadline_block=state["collect"]["deadline"],
                    max_artifact_bytes=caps[i],
                    max_manifest_bytes=self.settings.evaluation.max_manifest_bytes,
                )
                got = fetch_submission(
                    self.store, commitment, expect, dest_dir=self.state_dir / "artifacts" / str(r)
                )
                other_task = isinstance(got, Rejected) and got.code in OTHER_TASK_CODES
                if not (other_task and i < len(self.tasks) - 1):
                    break
            if isinstance(got, Rejected):
                rejected[a["hotkey"]] = {"code": got.code, "reason": got.reason}
                continue
            path = str(got.artifact_path.relative_to(self.state_dir))
            fetched[a["hotkey"]] = dict(
                path=path, artifact_sha256=got.artifact_sha256, weight=a["weight"],
                task_id=task.task_id,
            )  # fmt: skip
        return {"fetched": fetched, "rejected": rejected}

    @round_step("merge", after="fetch")
    def merge(self, r: int, state: dict) -> dict:
        """Merge the fetched deltas by consensus weight, then guard the result (module doc).

        Every candidate (the merge and each single delta) is measured on the round's held-out
        set, seeded like the validators' (eval_seed of the commit-deadline block hash). With
        several tasks, each task is merged and guarded on its own domain, and the survivors
        are composed into one delta (disjoint experts), which must pass the general check too.
        """
        fetched = state["fetch"]["fetched"]
        if not fetched:  # no forward pass (nor model load) for an empty round
            return kept_record("no accepted delta was fetched")
        if len(self.tasks) == 1:
            record, delta = self._choose(r, state, self.tasks[0], fetched)
        else:
            record, delta = self._compose(r, state, fetched)
        if delta is None:
            return {**record, "included": [], "deltas_digest": None, "delta_path": None}
        digest = deltas_digest(record["included"])
        return {**record, "deltas_digest": digest, "delta_path": self._save_delta(r, delta)}

    def _choose(self, r: int, state: dict, task: TaskSpec, fetched: dict) -> tuple[dict, dict]:
        """(record, chosen delta or None) for one task's fetched deltas: measure, merge, guard.

        Each readable delta is measured alone on the round's selection batches and scored by
        the validators' rule; only those it pays are merged (split_by_score), weighted by
        consensus. The best single is chosen there too; the merge and that single are then
        compared with the base on the guard's second set (_guard_set), which decides.

        At most one fetched delta is in memory at a time (a 30B-shaped delta is ~15 GB in
        float32): each file is read once to check it, once to measure it alone, once into the
        running average if included, and the best single again for the guard set.
        """
        base_dir = self._round_base(state)[0]
        read = self._reader(r, fetched, self._loaded(base_dir)[1], self._round_base(state)[1],
                            task)  # fmt: skip
        unreadable = {h: why for h in sorted(fetched) if (why := read.check(h))}
        hotkeys = [h for h in sorted(fetched) if h not in unreadable]
        if not hotkeys:
            reason = "no accepted delta passed the untrusted reader"
            return {**kept_record(reason), "unreadable": unreadable}, None
        select = self._evaluator(state, task)
        original = self._original_general(state, select.eval_set)  # cumulative drift
        singles = {h: self._measure(select, read(h, lazy=True), original, task) for h in hotkeys}
        included, excluded = split_by_score(singles)
        record = dict(seed=select.eval_set.seed, eval_set_digest=select.eval_set.digest())
        record.update(unreadable=unreadable, excluded=excluded, candidates=singles)
        record["base_domain_mean"] = mean(select.base_domain)
        if not included:
            codes = ", ".join(f"{h}: {e['code']}" for h, e in excluded.items())
            reason = f"no fetched delta earned a score this round, the validators' rule ({codes})"
            return {**record, **kept_record(reason), "candidates": singles}, None
        total = math.fsum(fetched[h]["weight"] for h in included)
        weights = {h: fetched[h]["weight"] / total for h in included}
        merged, outer = self._combine(r, base_dir, map(read, included), list(weights.values()))
        record["candidates"] = {MERGED: self._measure(select, merged, original, task), **singles}
        best = best_single({h: singles[h] for h in included})
        held = self._guard_set(state, task, select.eval_set, merged, best, read(best, lazy=True))
        decision, chosen, reason = held.pop("decision")
        record.update(best_single=best, guard=held, decision=decision, reason=reason)
        g = held["candidates"]
        record["merge_beats_best_single"] = g[MERGED]["domain_mean"] < g[best]["domain_mean"]
        if decision == KEPT_PREVIOUS:
            return {**record, "included": []}, None
        if decision == MERGED:
            included = [[h, fetched[h]["artifact_sha256"], weights[h]] for h in included]
            if outer is not None:  # the momentum only advances with a step that was taken
                outer.save(self.state_dir / "outer" / f"{r}.safetensors")
            return {**record, "included": included}, merged
        del merged  # the chosen single is read back instead
        included = [[chosen, fetched[chosen]["artifact_sha256"], 1.0]]
        return {**record, "included": included}, read(chosen)

    def _guard_set(self, state, task, selection, merged, best: str, best_delta) -> dict:
        """The merge and the best single measured on a SECOND set of batches, with the guard's
        decision on those numbers alone (merger.core.guard).

        Same sizes as the selection set, seeded by guard_seed(the round's eval seed) and drawn
        from the blocks the selection set did not use, so the comparison is free of the
        selection's bias: a candidate that won only on the batches it was chosen on loses here.
        """
        evaluator = self._evaluator(state, task, exclude=selection)
        original = self._original_general(state, evaluator.eval_set)
        measured = {MERGED: self._measure(evaluator, merged, original, task)}
        measured[best] = self._measure(evaluator, best_delta, original, task)
        del best_delta
        base_domain = mean(evaluator.base_domain)
        s = self.settings
        decision = guard(
            measured, s.evaluation.general_tolerance, s.cumulative_general_tolerance, base_domain
        )
        return dict(
            seed=evaluator.eval_set.seed, eval_set_digest=evaluator.eval_set.digest(),
            base_domain_mean=base_domain, base_general_mean=mean(evaluator.base_general),
            candidates=measured, decision=decision,
        )  # fmt: skip

    def _compose(self, r: int, state: dict, fetched: dict) -> tuple[dict, dict | None]:
        """(record, composed delta or None): each task chosen on its own domain, then the
        union of the survivors, checked once more on the general set."""
        per_task, chosen, included = {}, [], []
        for task in self.tasks:
            mine = {h: f for h, f in fetched.items() if f.get("task_id") == task.task_id}
            if not mine:
                per_task[str(task.task_id)] = kept_record("no accepted delta for this task")
                continue
            record, delta = self._choose(r, state, task, mine)
            per_task[str(task.task_id)] = record
            if delta is not None:
                chosen.append(delta)
                included += record["included"]
        if not chosen:
            return {
                **kept_record("no task has a delta that passed its guard"),
                "tasks": per_task,
            }, None
        composed = compose(chosen)  # disjoint by construction (check_disjoint)
        evaluator = self._evaluator(state, self.tasks[0])
        original = self._original_general(state, evaluator.eval_set)
        measured = self._measure(evaluator, composed, original, self.tasks[0])
        record = dict(seed=evaluator.eval_set.seed, tasks=per_task, unreadable={})
        record["candidates"] = {COMPOSED: measured}
        s = self.settings
        problem = general_problem(
            measured, s.evaluation.general_tolerance, s.cumulative_general_tolerance
        )
        if problem is not None:
            reason = f"the composition's {problem}"
            return {**kept_record(reason), **record, "included": []}, None
        reason = f"composed {len(chosen)} of {len(self.tasks)} tasks; general check passed"
        return {**record, "decision": COMPOSED, "reason": reason, "included": included}, composed

    @round_step("publish", after="merge")
    def publish(self, r: int, state: dict) -> dict:
        """Export base + the chosen delta, upload it and record it on chain, once.

        A round that kept the previous checkpoint publishes nothing. A checkpoint the chain
        already holds for r (sent, then killed before recording) is recorded, not sent again.
        """
        merged = state["merge"]
        if merged["decision"] == KEPT_PREVIOUS:
            return {"status": "nothing_published", "reason": merged["reason"]}
        on_chain = self.chain.checkpoint(r)
        if on_chain is not None:
            return self._publish_record("already_on_chain", on_chain)
        base_dir, base_hash = self._round_base(state)
        out = export_round(
            self.state_dir, state, self.settings, base_dir, self._card_context(r, base_hash)
        )
        digest, uri, _ = publish_dir(self.store, out)
        try:
            self.chain.publish_checkpoint(r, digest, uri, merged["deltas_digest"])
        except ChainError as e:
            if e.code != "AlreadyPublished":
                raise
            return self._publish_record("already_on_chain", self._checkpoint(r))
        return self._publish_record("sent", self._checkpoint(r))

    def current_base(self) -> Path:
        """The checkpoint the next round builds on: the latest this merger published (or saw
        published for its round), else base_dir."""
        stems = [p.stem for p in (self.state_dir / "rounds").glob("*.json") if p.stem.isdigit()]
        for q in sorted(map(int, stems), reverse=True):
            record = self.rounds.load(q).get("publish", {})
            if record.get("status") in ("sent", "already_on_chain"):
                return self.state_dir / "checkpoints" / str(q)
        return self.base_dir

    # -- step helpers -----------------------------------------------------------------------
    def _standing_before(self, r: int) -> dict[str, float]:
        """The validators' standing carried by the latest earlier round this merger collected
        ({} before any: everyone starts equal). The round files are its state: written
        atomically, and a collected round is never collected again, so a restart neither
        loses nor double-counts a round's agreement."""
        stems = [p.stem for p in (self.state_dir / "rounds").glob("*.json") if p.stem.isdigit()]
        for q in sorted((int(x) for x in stems if int(x) < r), reverse=True):
            collected = self.rounds.load(q).get("collect")
            if collected is not None:
                return collected.get("standing", {})
        return {}

    def _round_base(self, state: dict) -> tuple[Path, str]:
        return recorded_base(state["collect"], self.base_dir, self.base_hash)

    def _card_context(self, r: int, base_hash: str) -> dict:
        """What the model card needs beyond the round's record (merger.card)."""
        original = self.lineage.task_base_hash if self.lineage is not None else self.base_hash
        built_on = self.lineage.checkpoint_for(r) if self.lineage is not None else None
        return dict(
            round=r, chain=self.chain_label, task_id=self.task_id,
            original_base_digest=original, round_base_digest=base_hash,
            built_on_round=built_on.round if built_on is not None else None,
            method=self.settings.method, base_model=self.settings.base_model,
            max_scale=self.settings.max_scale,
        )  # fmt: skip

    def _reader(self, r: int, fetched: dict, layout, base_hash: str, task: TaskSpec) -> Reader:
        """Reads fetched deltas untrusted, under the validators' checks (merger.measure.Reader),
        each declaring its committer's shard of (task, round)."""
        assignment = task.assignment
        cap = min(max_delta_bytes(layout, assignment), self.settings.evaluation.max_artifact_bytes)
        checks = dict(layout=layout, assignment=assignment, max_bytes=cap)
        checks.update(expected_base_hash=base_hash, expected_round=r)
        return Reader(self.state_dir, fetched, checks, task.task_id, r)

    def _combine(self, r: int, base_dir: Path, deltas: Iterable[dict], weights: list[float]):
        """(delta to add to the base, the DiLoCo outer state after the step or None)."""
        average = streamed_average(deltas, weights)
        s = self.settings
        if s.method == "average":
            return average, None
        if s.method == "scaled":
            return scaled(average, contributor_scale(weights, s.max_scale)), None
        outer = outer_before(self.state_dir, r, base_dir, s.outer_lr, s.outer_momentum)
        return outer.step(average), outer

    def _measure(self, evaluator, delta, original: list[float] | None, task: TaskSpec) -> dict:
        """merger.measure.measure with this merger's settings, on `task`'s domain."""
        return measure(
            evaluator, delta, settings=self.settings, original=original,
            domain_name=task.domain_spec,
        )  # fmt: skip

    def _evaluator(self, state: dict, task: TaskSpec, exclude=None) -> Evaluator:
        """An Evaluator on the round's base and seeded held-out batches: the validators' set
        (eval_seed of the commit-deadline block hash; protocol.moe.evaluate), so scores and
        the selection are measured on exactly the validators' batches; with `exclude` (that
        set) the guard's second set instead (guard_seed, disjoint blocks)."""
        model, layout, tokenizer = self._loaded(self._round_base(state)[0])
        s = self.settings.evaluation
        seed = eval_seed(state["collect"]["block_hash"], state["round"], task.task_id)
        if exclude is not None:
            seed = guard_seed(seed)
        specs = (task.domain_spec, self.general_specs)
        eval_set = build_eval_set(tokenizer, *specs, seed, **s.eval_set_sizes(), exclude=exclude)
        return Evaluator(model, layout, eval_set, device=s.device)

    def _original_general(self, state: dict, eval_set) -> list[float] | None:
        """The task's original base's general losses on this eval set (cached per eval set), or
        None while the round builds on that base itself (protocol.round.drift)."""
        if self.lineage is None or self._round_base(state)[1] == self.lineage.task_base_hash:
            return None
        return original_general_losses(
            self.lineage.task_base, eval_set, cache_dir=self.state_dir / "original_general",
            device=self.settings.evaluation.device,
        )  # fmt: skip

    def _save_delta(self, r: int, delta: dict) -> str:
        path = self.state_dir / "chosen" / f"{r}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in delta.items()}
        write_bytes_atomic(path, save(tensors))
        return str(path.relative_to(self.state_dir))

    def _loaded(self, base_dir: Path):
        """The round's base, its expert layout and tokenizer (deltas are applied and reverted
        in place by the evaluator, so the model is the base again after every measurement)."""
        if self._base is None or self._base_loaded_from != base_dir:
            self._base = None  # free the previous round's model before loading the next
            model = load_model(base_dir, device=self.settings.evaluation.device)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self._base, self._base_loaded_from = (model, expert_layout(model), tokenizer), base_dir
        return self._base

    def _checkpoint(self, r: int):
        return self.chain.checkpoint(r)

    def _publish_record(self, status: str, c) -> dict:
        return {"status": status, "digest": c.digest, "uri": c.uri, "block": c.block}


def build(ctx: RoleContext, section, task) -> Merger:
    """The merger a [merger] section describes: the task's data, plus its composed tasks."""
    compose = [(t.task_id, t.assignment, t.domain) for t in section.compose]
    return Merger(
        ctx, domain_spec=task.domain, general_specs=task.general, state_dir=section.state_dir,
        settings=section.settings, compose=compose,
    )  # fmt: skip


def _task_spec(t: tuple, base_hash: str) -> TaskSpec:
    """A composed task from (task_id, assignment path, domain spec), checked against the base."""
    task_id, assignment_path, domain_spec = t
    assignment = Assignment.load(assignment_path)
    if assignment.model_hash != base_hash:
        raise ValueError(
            f"{assignment_path} was selected on another base ({assignment.model_hash})"
        )
    return TaskSpec(task_id, assignment, domain_spec)
