"""The merger's round as named steps: collect -> fetch -> merge -> publish.

    merger = Merger(chain, store, schedule=schedule, chain_label=evm_chain(31337, registry),
                    task_id=0, base_dir="runs/base", assignment_path="runs/math.json",
                    domain_spec="corpus:math", general_specs=["corpus:prose", "corpus:code"],
                    state_dir="runs/merger", settings=MergerSettings())
    merger.run_round(r, wait=block_waiter(chain))      # once per round, in its merge phase
    merger.current_base()                              # the checkpoint the next round builds on

collect reads the validators' weights for the round (final once the merge phase starts) and
keeps the miners with a positive consensus weight; fetch gets their deltas under the same
rules as validators (protocol.submissions); merge averages them by consensus weight (or takes
a DiLoCo outer step) and GUARDS the result on the round's held-out eval set: the merge must
beat the best single delta on the domain and stay within the general tolerance, else the best
single delta is used if it passes the general check, else the previous checkpoint is kept.
publish exports base + chosen delta, uploads it and records it on chain once.

Like the validator, each step writes its record into `state_dir/rounds/<r>.json` (atomically)
and a step whose record exists returns it, so a merger killed anywhere finishes the round with
the same result. State directory:
    rounds/<r>.json                           one record per finished step (JSON)
    artifacts/<r>/<hotkey>.{manifest.json,safetensors}   fetched and verified submissions
    chosen/<r>.safetensors                    the delta the guard chose (base + it = checkpoint)
    outer/<r>.safetensors                     DiLoCo outer state after round r (method "diloco")
    checkpoints/<r>/                          the exported HF checkpoint

torch and transformers are imported by the merge and publish steps only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.chain import Chain, ChainError, Commitment
from protocol.hashing import sha256_dir, sha256_json
from protocol.keys import normalise
from protocol.lineage import Lineage, base_record, recorded_base
from protocol.manifest import MAX_JSON_BYTES
from protocol.rounds import RoundError, RoundStore, round_step
from protocol.schedule import Schedule, commit_deadline, phase_bounds
from protocol.storage import Store
from protocol.submissions import Expectations, Rejected, fetch_submission

METHODS = ("average", "diloco")
MERGED, BEST_SINGLE, KEPT_PREVIOUS = "merged", "best_single", "kept_previous"  # guard decisions

Wait = Callable[[int], None]  # returns once chain.block() >= the block given


@dataclass(frozen=True)
class MergerSettings:
    """How the merger merges and guards. Eval sizes should match the validators' so the guard
    measures on the batches the scores came from."""

    method: str = "average"
    """"average": consensus-weighted average; "diloco": an outer Nesterov step on that average."""
    outer_lr: float = 0.7
    """DiLoCo outer learning rate (method "diloco")."""
    outer_momentum: float = 0.9
    """DiLoCo outer momentum (method "diloco"), in [0, 1)."""
    domain_batches: int = 24
    """Held-out domain batches the guard evaluates (>= 2)."""
    general_batches: int = 24
    """Held-out general batches the guard evaluates (>= 2)."""
    seq_len: int = 256
    """Tokens per evaluation sequence."""
    batch_size: int = 8
    """Sequences per evaluation batch."""
    max_tokens: int = 200_000
    """Test-split tokens read per data spec to draw the batches from."""
    general_tolerance: float = 0.05
    """Largest general-loss rise (nats/batch, upper confidence bound) a published delta may cause."""
    confidence: float = 0.95
    """One-sided confidence level of that bound, in [0.5, 1)."""
    max_artifact_bytes: int = 1 << 30
    """Largest delta fetched."""
    max_manifest_bytes: int = MAX_JSON_BYTES
    """Largest signed manifest fetched."""
    device: str = "cpu"
    """torch device the guard evaluates on."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        minimums = dict(domain_batches=2, general_batches=2, seq_len=1, batch_size=1)
        minimums.update(max_tokens=1, max_artifact_bytes=1, max_manifest_bytes=1)
        for name, low in minimums.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        ranges = {
            "general_tolerance": (lambda x: x >= 0, "finite and >= 0"),
            "confidence": (lambda x: 0.5 <= x < 1, "in [0.5, 1)"),
            "outer_lr": (lambda x: x > 0, "> 0"),
            "outer_momentum": (lambda x: 0 <= x < 1, "in [0, 1)"),
        }
        for name, (ok, what) in ranges.items():
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}")


# ----------------------------------------------------------------------------- pure core


def consensus_weights(weights: dict[int, dict[int, int]], permitted: set[int]) -> dict[int, float]:
    """Miner uid -> mean over permitted validators of their normalised weights.

    Validators without a permit are ignored; one that set an all-zero vector counts as zero
    for everyone. Miners with no weight from anyone are absent.
    """
    voters = [v for v in sorted(weights) if v in permitted]
    total: dict[int, float] = {}
    for v in voters:
        s = sum(weights[v].values())
        for uid, w in weights[v].items():
            if s > 0 and w > 0:
                total[uid] = total.get(uid, 0.0) + w / s
    return {uid: t / len(voters) for uid, t in sorted(total.items())}


def guard(candidates: dict[str, dict], tolerance: float) -> tuple[str, str | None, str]:
    """(decision, chosen candidate name or None, reason) from measured candidates.

    `candidates` maps "merged" and each single hotkey to {"domain_mean", "general_rise"}
    (general_rise: upper bound of the general-loss rise over the base). The merge is taken if
    its domain loss is <= every single's and its rise within tolerance; else the single with the
    lowest domain loss if its rise is within tolerance; else nothing (keep the previous).
    """
    singles = {k: c for k, c in candidates.items() if k != MERGED}
    best = min(singles, key=lambda k: (singles[k]["domain_mean"], k))
    m, b = candidates[MERGED], singles[best]
    ok = lambda c: math.isfinite(c["general_rise"]) and c["general_rise"] <= tolerance  # noqa: E731
    if ok(m) and m["domain_mean"] <= b["domain_mean"]:
        return MERGED, MERGED, "merge beats the best single delta and passes the general check"
    why = (
        f"merge domain loss {m['domain_mean']:.5g} > best single {b['domain_mean']:.5g}"
        if ok(m)
        else f"merge general rise {m['general_rise']:.5g} over tolerance {tolerance}"
    )
    if ok(b):
        return BEST_SINGLE, best, f"{why}; using the best single delta ({best})"
    reason = f"{why}; best single {best} general rise {b['general_rise']:.5g} over {tolerance}"
    return KEPT_PREVIOUS, None, reason


def deltas_digest(included: Sequence[Sequence]) -> str:
    """sha256 of the canonical JSON list of [hotkey, artifact sha256, weight] included."""
    return sha256_json([list(x) for x in included])


# ----------------------------------------------------------------------------- the role


class Merger:
    """One merger key's rounds; chain, store, base and data come in through the constructor."""

    def __init__(
        self,
        chain: Chain,
        store: Store,
        *,
        schedule: Schedule,
        chain_label: str,
        task_id: int,
        base_dir: str | Path,
        assignment_path: str | Path,
        domain_spec: str,
        general_specs: Sequence[str],
        state_dir: str | Path,
        settings: MergerSettings,
        lineage: Lineage | None = None,
    ):
        from protocol.experts import Assignment

        if not isinstance(settings, MergerSettings):
            raise ValueError(f"settings must be MergerSettings, got {settings!r}")
        if isinstance(general_specs, str) or not general_specs:
            raise ValueError("general_specs: give a list of at least one spec (the guard)")
        self.chain, self.store, self.schedule, self.settings = chain, store, schedule, settings
        self.chain_label, self.task_id = chain_label, task_id
        self.domain_spec, self.general_specs = domain_spec, list(general_specs)
        self.base_dir, self.state_dir = Path(base_dir), Path(state_dir)
        self.rounds = RoundStore(self.state_dir)
        try:
            self.base_hash = sha256_dir(self.base_dir)
            self.assignment = Assignment.load(assignment_path)
        except FileNotFoundError as e:
            raise ValueError(f"base or assignment missing: {e}") from None
        (self.state_dir / "rounds").mkdir(parents=True, exist_ok=True)
        # With a lineage, round r merges onto the checkpoint it builds on (protocol.lineage).
        self.lineage = lineage
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
        permitted = {m.uid for m in members if m.validator_permit}
        consensus = consensus_weights(self.chain.weights(r), permitted)
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
            "accepted": accepted,
            "skipped": skipped,
            "base": base_record(self.lineage, r, self.base_dir, self.base_hash),
        }

    @round_step("fetch", after="collect")
    def fetch(self, r: int, state: dict) -> dict:
        """The accepted miners' deltas, under the validators' rules (protocol.submissions)."""
        expect = Expectations(
            chain=self.chain_label,
            task_id=self.task_id,
            base_hash=self._round_base(state)[1],
            assignment_hash=self.assignment.hash(),
            registered_hotkeys=[m.hotkey for m in self.chain.members()],
            deadline_block=state["collect"]["deadline"],
            max_artifact_bytes=self.settings.max_artifact_bytes,
            max_manifest_bytes=self.settings.max_manifest_bytes,
        )
        fetched, rejected = {}, {}
        for a in state["collect"]["accepted"]:
            got = fetch_submission(
                self.store,
                Commitment(a["hotkey"], r, a["digest"], a["block"]),
                expect,
                dest_dir=self.state_dir / "artifacts" / str(r),
            )
            if isinstance(got, Rejected):
                rejected[a["hotkey"]] = {"code": got.code, "reason": got.reason}
                continue
            path = str(got.artifact_path.relative_to(self.state_dir))
            fetched[a["hotkey"]] = dict(
                path=path, artifact_sha256=got.artifact_sha256, weight=a["weight"]
            )
        return {"fetched": fetched, "rejected": rejected}

    @round_step("merge", after="fetch")
    def merge(self, r: int, state: dict) -> dict:
        """Merge the fetched deltas by consensus weight, then guard the result (module doc).

        Every candidate (the merge and each single delta) is measured on the round's held-out
        set, seeded like the validators' (eval_seed of the commit-deadline block hash).
        """
        fetched = state["fetch"]["fetched"]
        if not fetched:  # no forward pass (nor model load) for an empty round
            return _kept("no accepted delta was fetched")
        model, layout, tokenizer = self._loaded(self._round_base(state)[0])
        deltas, unreadable = self._read(r, fetched, layout, self._round_base(state)[1])
        if not deltas:
            return {
                **_kept("no accepted delta passed the untrusted reader"),
                "unreadable": unreadable,
            }
        hotkeys = sorted(deltas)
        total = sum(fetched[h]["weight"] for h in hotkeys)
        weights = {h: fetched[h]["weight"] / total for h in hotkeys}
        merged, outer = self._combine(
            r, [deltas[h] for h in hotkeys], [weights[h] for h in hotkeys]
        )
        evaluator, seed = self._evaluator(state, model, layout, tokenizer)
        candidates = {MERGED: self._measure(evaluator, merged)}
        candidates.update({h: self._measure(evaluator, deltas[h]) for h in hotkeys})
        decision, chosen, reason = guard(candidates, self.settings.general_tolerance)
        record = dict(seed=seed, eval_set_digest=evaluator.eval_set.digest(), reason=reason)
        record.update(decision=decision, candidates=candidates, unreadable=unreadable)
        record["base_domain_mean"] = _mean(evaluator.base_domain)
        if decision == KEPT_PREVIOUS:
            return {**record, "included": [], "deltas_digest": None, "delta_path": None}
        if decision == MERGED:
            included = [[h, fetched[h]["artifact_sha256"], weights[h]] for h in hotkeys]
            if outer is not None:  # the momentum only advances with a step that was taken
                outer.save(self.state_dir / "outer" / f"{r}.safetensors")
        else:
            included = [[chosen, fetched[chosen]["artifact_sha256"], 1.0]]
        delta_path = self._save_delta(r, merged if decision == MERGED else deltas[chosen])
        return {
            **record,
            "included": included,
            "deltas_digest": deltas_digest(included),
            "delta_path": delta_path,
        }

    @round_step("publish", after="merge")
    def publish(self, r: int, state: dict) -> dict:
        """Export base + the chosen delta, upload it and record it on chain, once.

        A round that kept the previous checkpoint publishes nothing. A checkpoint the chain
        already holds for r (sent, then killed before recording) is recorded, not sent again.
        """
        merged = state["merge"]
        if merged["decision"] == KEPT_PREVIOUS:
            return {"status": "nothing_published", "reason": merged["reason"]}
        on_chain = [c for c in self.chain.checkpoints() if c.round == r]
        if on_chain:
            return self._publish_record("already_on_chain", on_chain[0])
        from protocol.checkpoint import publish_dir

        out = self._export(r, merged, *self._round_base(state))
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
    def _round_base(self, state: dict) -> tuple[Path, str]:
        return recorded_base(state["collect"], self.base_dir, self.base_hash)

    def _export(self, r: int, merged: dict, base_dir: Path, base_hash: str) -> Path:
        """The exported checkpoint dir; one installed by a killed run is complete (atomic)."""
        from safetensors.torch import load_file

        from protocol.export import export_checkpoint

        out = self.state_dir / "checkpoints" / str(r)
        if not out.exists():
            from protocol.atomic import remove_stale_temps

            remove_stale_temps(out)  # a whole checkpoint's worth, if an export was killed
            info = {"round": r, "decision": merged["decision"], "included": merged["included"]}
            info["method"] = self.settings.method
            delta = load_file(str(self.state_dir / merged["delta_path"]))
            export_checkpoint(base_dir, delta, out, info=info, base_hash=base_hash)
        return out

    def _read(self, r: int, fetched: dict, layout, base_hash: str) -> tuple[dict, dict]:
        """Fetched deltas loaded untrusted (as validators do): (tensors, reasons refused)."""
        from protocol.delta import DeltaRejected, max_delta_bytes
        from protocol.delta_reader import read_delta_untrusted

        cap = min(max_delta_bytes(layout, self.assignment), self.settings.max_artifact_bytes)
        deltas, unreadable = {}, {}
        for hotkey, f in sorted(fetched.items()):
            try:
                _, deltas[hotkey] = read_delta_untrusted(
                    self.state_dir / f["path"],
                    layout=layout,
                    assignment=self.assignment,
                    max_bytes=cap,
                    expected_base_hash=base_hash,
                    expected_round=r,
                    expected_sha256=f["artifact_sha256"],
                )
            except DeltaRejected as e:
                unreadable[hotkey] = f"{e.code}: {e.message}"
        return deltas, unreadable

    def _combine(self, r: int, deltas: list, weights: list[float]):
        """(delta to add to the base, the DiLoCo outer state after the step or None)."""
        from protocol.merge import weighted_average

        average = weighted_average(deltas, weights)
        if self.settings.method == "average":
            return average, None
        outer = self._outer_before(r)
        return outer.step(average), outer

    def _outer_before(self, r: int):
        """The DiLoCo state after the latest earlier round that took a step, or a fresh one."""
        from protocol.merge import DiLoCoOuter

        folder = self.state_dir / "outer"
        stems = [p.stem for p in folder.glob("*.safetensors") if p.stem.isdigit()]
        earlier = sorted((int(x) for x in stems if int(x) < r), reverse=True)
        if earlier:
            return DiLoCoOuter.load(folder / f"{earlier[0]}.safetensors")
        s = self.settings
        return DiLoCoOuter(lr=s.outer_lr, momentum=s.outer_momentum)

    def _evaluator(self, state: dict, model, layout, tokenizer):
        """(Evaluator on the round's seeded held-out batches, the seed)."""
        # The same eval set and evaluator as the validators (protocol.evaluate), so the guard
        # measures on exactly the validators' batches.
        from protocol.evaluate import Evaluator, build_eval_set, eval_seed

        s = self.settings
        seed = eval_seed(state["collect"]["block_hash"], state["round"], self.task_id)
        sizes = ("seq_len", "batch_size", "domain_batches", "general_batches", "max_tokens")
        specs = (self.domain_spec, self.general_specs)
        eval_set = build_eval_set(tokenizer, *specs, seed, **{k: getattr(s, k) for k in sizes})
        return Evaluator(model, layout, eval_set, device=s.device), seed

    def _measure(self, evaluator, delta) -> dict:
        """Domain mean loss and the general rise's upper bound of base + delta."""
        from protocol.scoring import paired_stats

        domain, general = evaluator.evaluate(delta)
        stats = paired_stats(evaluator.base_general, general, confidence=self.settings.confidence)
        rise = -stats.lcb if stats.valid else math.inf
        return {"domain_mean": _mean(domain), "general_rise": rise}

    def _save_delta(self, r: int, delta: dict) -> str:
        from safetensors.torch import save

        from protocol.atomic import write_bytes_atomic

        path = self.state_dir / "chosen" / f"{r}.safetensors"
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in delta.items()}
        write_bytes_atomic(path, save(tensors))
        return str(path.relative_to(self.state_dir))

    def _loaded(self, base_dir: Path):
        """The round's base, its expert layout and tokenizer (deltas are applied and reverted
        in place by the evaluator, so the model is the base again after every measurement)."""
        if self._base is None or self._base_loaded_from != base_dir:
            from transformers import AutoTokenizer

            from protocol.model import expert_layout, load_model

            self._base = None  # free the previous round's model before loading the next
            model = load_model(base_dir, device=self.settings.device)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self._base, self._base_loaded_from = (model, expert_layout(model), tokenizer), base_dir
        return self._base

    def _checkpoint(self, r: int):
        return next(c for c in self.chain.checkpoints() if c.round == r)

    def _publish_record(self, status: str, c) -> dict:
        return {"status": status, "digest": c.digest, "uri": c.uri, "block": c.block}

    # -- state ------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    m = math.fsum(xs) / len(xs)
    return m if math.isfinite(m) else math.inf


def _kept(reason: str) -> dict:
    """A merge record that keeps the previous checkpoint."""
    return dict(
        decision=KEPT_PREVIOUS,
        reason=reason,
        included=[],
        deltas_digest=None,
        delta_path=None,
        candidates={},
    )
