"""The validator's round as named steps: collect -> fetch -> evaluate -> score -> weights_salt
-> commit_weights -> set_weights.

    ctx = RoleContext(chain, store, schedule=chain.schedule(), chain_label=chain.label(),
                      task_id=0, base_dir="runs/base", assignment_path="runs/math.json")
    validator = Validator(ctx, domain_spec="corpus:math", general_specs=["corpus:prose"],
                          state_dir="runs/validator", settings=ValidatorSettings())
    validator.run_round(r, wait=block_waiter(chain))     # protocol.round.runtime: once per round
    print(format_explain(validator.explain(r)))

Each step reads the chain, the store or the previous step's record and writes its own record
into `state_dir/rounds/<r>.json` (atomically) before returning it. A step whose record exists
returns it and does nothing else, so a validator killed at any point runs the same calls again
and finishes the round with the same result. The steps with an effect outside the state,
commit_weights and set_weights, first ask the chain whether their transaction already landed.

Weights are committed, then revealed: commit_weights sends a hash of the weights (with a random
salt, recorded by weights_salt BEFORE the transaction is sent, so a restarted validator reveals
with the salt it committed) in the round's evaluate phase; set_weights reveals them in the
weights phase. Only hashes are on chain while commitments are open, so no validator can copy
another's weights of the round; the evaluation must therefore finish within the evaluate phase.

State directory:
    rounds/<r>.json                            one record per finished step (JSON)
    artifacts/<r>/<hotkey>.manifest.json       the signed manifest, as fetched and verified
    artifacts/<r>/<hotkey>.safetensors         the delta, as fetched and verified

Length: past 500 lines because each of the seven steps keeps its resumable-state checks beside
its body; the pure rules live in validator/evaluate.py, history.py and protocol/round/.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import AutoTokenizer

from protocol.artifact.delta import max_delta_bytes
from protocol.artifact.sketch import load_or_create_secret
from protocol.artifact.untrusted import read_delta_untrusted
from protocol.chain import ChainError, Commitment
from protocol.identity.hashing import sha256_dir
from protocol.identity.keys import normalise
from protocol.moe.data import ALL
from protocol.moe.evaluate import EvalSet, Evaluator, build_eval_set, eval_seed, heldout_blocks
from protocol.moe.experts import Assignment
from protocol.moe.model import config_layout, expert_layout, load_model
from protocol.round.context import RoleContext
from protocol.round.drift import original_general_losses
from protocol.round.lineage import base_record, recorded_base
from protocol.round.schedule import WrongPhase, commit_deadline, phase_bounds
from protocol.round.scoring import (
    Entry,
    ExplainRow,
    moving_average,
    seeded_tiebreak,
    weights_from_scores,
)
from protocol.round.state import RoundError, RoundStore, round_step
from protocol.round.submissions import (  # noqa: F401 (codes re-exported)
    MALFORMED,
    NOT_REVEALED,
    UNAVAILABLE,
    Expectations,
    Rejected,
    fetch_submission,
)
from validator.evaluate import evaluate_round
from validator.explain import explain_recorded
from validator.history import SECRET_FILE, load_fingerprints, load_history, save_round
from validator.settings import ValidatorSettings
from validator.strategies import COPIER, strategy_weights

Wait = Callable[[int], None]  # returns once chain.block() >= the block given
log = logging.getLogger("moesaic.validator")


FETCH_WORKERS = 8  # parallel submission downloads per round
# Earlier rounds whose deltas a new one is compared with: a replay older than this is not
# caught by the duplicate rule (by then the lineage has usually moved the base on).
HISTORY_ROUNDS = 8


class PhaseMissed(RoundError, WrongPhase):
    """A weights transaction would land outside its phase: the round is over for this
    validator (the run loop goes on with the next one)."""


class Validator:
    """One validator key's rounds; chain, store and base come in the RoleContext, data here.

    `hotkey` is the identity this validator's chain client signs as; it defaults to the client's
    `identity()` and is needed to recognise weights already sent.
    """

    def __init__(
        self,
        ctx: RoleContext,
        *,
        domain_spec: str,
        general_specs: Sequence[str],
        state_dir: str | Path,
        settings: ValidatorSettings,
        hotkey: str | None = None,
    ):
        _check_args(domain_spec, general_specs, settings)
        self.chain, self.store, self.schedule = ctx.chain, ctx.store, ctx.schedule
        self.settings, self.chain_label, self.task_id = settings, ctx.chain_label, ctx.task_id
        self.domain_spec, self.general_specs = domain_spec, tuple(general_specs)
        self.base_dir, assignment_path = ctx.base_dir, ctx.assignment_path
        try:
            self.base_hash = sha256_dir(self.base_dir)
            self.assignment = Assignment.load(assignment_path)
        except FileNotFoundError as e:
            raise ValueError(f"base or assignment missing: {e}") from None
        if self.assignment.model_hash != self.base_hash:
            raise ValueError(
                f"{assignment_path} was selected on base {self.assignment.model_hash}, "
                f"not on {self.base_dir} ({self.base_hash})"
            )
        self._check_heldout()
        self.hotkey = hotkey or self.chain.identity()
        if not self.hotkey:
            raise ValueError("pass hotkey=: this chain client is read-only (it sends as no key)")
        self.state_dir = Path(state_dir)
        self.rounds = RoundStore(self.state_dir)
        (self.state_dir / "rounds").mkdir(parents=True, exist_ok=True)
        self._base = None  # (model, layout, tokenizer), loaded by the first evaluation
        self._base_loaded_from: Path | None = None
        # With a lineage, round r is evaluated on the checkpoint it builds on (protocol.round.lineage);
        # without one, every round on base_dir.
        self.lineage = ctx.lineage

    # -- the round --------------------------------------------------------------------------
    def run_round(self, r: int, wait: Wait) -> dict:
        """The whole round as the protocol reads; returns its record. Safe to call again after
        a crash: finished steps return their record. `wait(block)` returns once the chain has
        reached `block` (a daemon polls, a test mines)."""
        wait(commit_deadline(self.schedule, r) + 1)
        self.collect(r)
        wait(phase_bounds(self.schedule, r, "evaluate")[0])  # miners reveal until then
        self.fetch(r)
        self.evaluate(r)
        self._drop_rejected_files(r)
        self.score(r)
        self.weights_salt(r)
        self.commit_weights(r)  # in the evaluate phase, where fetch already waited for
        wait(phase_bounds(self.schedule, r, "weights")[0] - 1)  # the next tx lands in the phase
        self.set_weights(r)
        return self.rounds.load(r)

    @round_step("collect")
    def collect(self, r: int, state: dict) -> dict:
        """Commitments for round r that count: landed by the commit deadline, by a registered key.

        Refused until the chain is past the deadline: only then is the set final and the
        deadline block's hash (the eval seed) known. Each entry gets a tiebreak seeded by that
        hash, so commitments in one block are ordered without always favouring the same key.
        """
        deadline, now = commit_deadline(self.schedule, r), self.chain.block()
        if now <= deadline:
            raise RoundError(
                f"round {r}: commitments close at block {deadline} and the chain is at {now}; "
                "collect once a later block exists"
            )
        block_hash = self.chain.block_hash(deadline)
        spelling = {normalise(m.hotkey): m.hotkey for m in self.chain.members()}
        entries: dict[str, dict] = {}
        for c in sorted(self.chain.commitments(r), key=lambda c: c.block):
            hotkey = spelling.get(normalise(c.hotkey))
            # The earliest commitment per key is the one that counts: a chain that allowed a
            # second one must not let a miner swap its artifact after seeing others'.
            if c.round != r or c.block > deadline or hotkey is None or hotkey in entries:
                continue
            tiebreak = seeded_tiebreak(hotkey, block_hash)
            entries[hotkey] = dict(
                hotkey=hotkey, digest=c.digest.lower(), block=c.block, tiebreak=tiebreak
            )
        ordered = sorted(entries.values(), key=lambda e: (e["block"], e["tiebreak"], e["hotkey"]))
        record = {"deadline": deadline, "block_hash": block_hash, "entries": ordered}
        return {**record, "base": self._resolve_base(r)}

    @round_step("fetch", after="collect")
    def fetch(self, r: int, state: dict) -> dict:
        """Each entry's signed manifest (by the committed digest), checked, then its artifact
        (protocol.round.submissions.fetch_submission, shared with the merger).

        Refused until the reveal phase is over (the first evaluate block exists): miners upload
        only after the commit deadline, and fetching earlier would score late revealers as
        absent. A miner's failure is its outcome, never an exception: an object the store does
        not have is "not_revealed", one that cannot be fetched "unavailable" (with the storage
        error), a manifest check_manifest refuses keeps that check's code. Both come from this
        validator's store by sha256, not from the uri a manifest names, so a miner cannot point
        validators at hosts of its choosing.
        """
        revealed_by, now = phase_bounds(self.schedule, r, "evaluate")[0], self.chain.block()
        if now < revealed_by:
            raise RoundError(
                f"round {r}: miners reveal until block {revealed_by} and the chain is at {now}; "
                "fetch once the evaluate phase has started"
            )
        registered = [m.hotkey for m in self.chain.members()]
        entries = state["collect"]["entries"]
        cap = self._delta_cap(state) if entries else 0
        # Downloads wait on the network, not the CPU: fetch several miners at once. Each
        # writes its own files and results keep the entries' order, so the record is the same
        # as a sequential fetch's.
        with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
            results = list(
                pool.map(lambda e: self._fetch_one(r, e, state, registered, cap), entries)
            )
        fetched, rejected = {}, {}
        for entry, (ok, got) in zip(entries, results, strict=True):
            (fetched if ok else rejected)[entry["hotkey"]] = got
        return {"fetched": fetched, "rejected": rejected}

    @round_step("evaluate", after="fetch")
    def evaluate(self, r: int, state: dict) -> dict:
        """Score the fetched artifacts on this round's seeded held-out batches.

        The seed is eval_seed(hash of the commit-deadline block, r, task_id), unknown to miners
        while they trained; the domain batches come from this validator's private held-out text
        (`heldout`), else from the public test split (`eval_set`). Fetch rejections are merged
        in, so every collected entry has exactly one outcome (value, code, reason).
        """
        seed = eval_seed(state["collect"]["block_hash"], r, self.task_id)
        outcomes, eval_set_digest = dict(state["fetch"]["rejected"]), None
        if self.settings.strategy == COPIER:  # the attack's point: weights without the work
            outcomes.update({h: _not_evaluated() for h in state["fetch"]["fetched"]})
        elif state["fetch"]["fetched"]:  # no forward pass (nor model load) for an empty round
            measured, eval_set_digest = self._evaluate_files(r, seed, state)
            outcomes.update(measured)
        heldout = "private" if self.settings.heldout else "public"  # never the private path
        return {"seed": seed, "eval_set_digest": eval_set_digest, "outcomes": outcomes,
                "heldout": heldout}  # fmt: skip

    @round_step("score", after="evaluate")
    def score(self, r: int, state: dict) -> dict:
        """Moving average per hotkey over this round's outcomes and the latest earlier scored
        round's averages, then weights per uid of the hotkeys registered now (deregistered
        hotkeys lose their history; a uid re-registered by someone else starts from nothing)."""
        uids = {m.hotkey: m.uid for m in self.chain.members()}
        previous_round, previous = self._previous_averages(r)
        current = {h: o["value"] for h, o in state["evaluate"]["outcomes"].items()}
        averages = moving_average(previous, current, self.settings.ema_alpha, registered=set(uids))
        weight_uids, weights = weights_from_scores({uids[h]: a for h, a in averages.items()})
        weight_uids, weights = strategy_weights(self.settings, self.chain, self.hotkey, r, weight_uids, weights)  # fmt: skip
        return {
            "previous_round": previous_round,
            "uids": uids,
            "averages": averages,
            "weights": {"uids": weight_uids, "weights": weights},
        }

    @round_step("weights_salt", after="score")
    def weights_salt(self, r: int, state: dict) -> dict:
        """A fresh random salt for round r's weight commitment, recorded before the commitment
        is sent (a validator killed after sending must reveal with the same salt)."""
        return {"salt": secrets.token_hex(32)}

    @round_step("commit_weights", after="weights_salt")
    def commit_weights(self, r: int, state: dict) -> dict:
        """Commit a hash of the score step's weights for round r, once, in its evaluate phase.

        The chain is asked first: a commitment it already holds from this key (sent, then
        killed before recording) is recorded, not sent again.
        """
        self._own_uid()  # a key without a uid cannot commit: say so before anything is sent
        uids, weights = state["score"]["weights"]["uids"], state["score"]["weights"]["weights"]
        if not uids:  # nobody has credit: nothing to commit, nothing to reveal
            return {"status": "nothing_to_set", "block": None}
        if self.chain.weight_commitment(r, self.hotkey) is not None:
            return {"status": "already_on_chain", "block": None}
        self._require_landing(r, "evaluate")
        salt = bytes.fromhex(state["weights_salt"]["salt"])
        try:
            block = self.chain.commit_weights(r, uids, weights, salt)
        except ChainError as e:
            if e.code != "AlreadyCommittedWeights":  # sent by a run killed before it was mined
                raise
            return {"status": "already_on_chain", "block": None}
        return {"status": "sent", "block": block}

    @round_step("set_weights", after="commit_weights")
    def set_weights(self, r: int, state: dict) -> dict:
        """Reveal the committed weights for round r, once.

        The chain is asked first: weights it already holds from this key (sent, then killed
        before recording) are recorded, not sent again, even after the phase. Otherwise the
        transaction's block, the next one, must fall in round r's weights phase.
        """
        own = self._own_uid()
        if own in self.chain.weights(r):
            return self._weights_record(r, "already_on_chain", None, own)
        uids, weights = state["score"]["weights"]["uids"], state["score"]["weights"]["weights"]
        if state["commit_weights"]["status"] == "nothing_to_set":
            return self._weights_record(r, "nothing_to_set", None, own)
        self._require_landing(r, "weights")
        salt = bytes.fromhex(state["weights_salt"]["salt"])
        try:
            block = self.chain.set_weights(r, uids, weights, salt)
        except ChainError as e:
            if e.code != "AlreadySetWeights":  # sent by a run killed before the tx was mined
                raise
            return self._weights_record(r, "already_on_chain", None, own)
        return self._weights_record(r, "sent", block, own)

    def explain(self, r: int) -> list[ExplainRow]:
        """Why each miner has its weight for round r, from the recorded state alone."""
        state = self.rounds.load(r)
        self._need(state, "score", r)
        return explain_recorded(state)

    # -- step helpers -----------------------------------------------------------------------
    def _delta_cap(self, state: dict) -> int:
        """The most bytes a submission may have: the largest well-formed delta for this
        assignment on the round's base (any encoding), under the operator's cap."""
        base_dir = recorded_base(state["collect"], self.base_dir, self.base_hash)[0]
        bound = max_delta_bytes(config_layout(str(base_dir)), self.assignment)
        return min(bound, self.settings.evaluation.max_artifact_bytes)

    def _drop_rejected_files(self, r: int) -> None:
        """Delete the delta files evaluation refused (read_delta_untrusted's rejections): a
        validator keeps no miner's junk. Their manifests and the round record say why. Run
        after evaluate is recorded, so a restarted evaluate never misses a file."""
        state = self.rounds.load(r)
        outcomes = state["evaluate"]["outcomes"]
        for hotkey, f in state["fetch"]["fetched"].items():
            if outcomes.get(hotkey, {}).get("rejection"):
                (self.state_dir / f["path"]).unlink(missing_ok=True)

    def _fetch_one(
        self, r: int, entry: dict, state: dict, registered: list[str], cap: int
    ) -> tuple[bool, dict]:
        """(True, what was fetched) or (False, the rejection outcome) for one entry; nothing
        past `cap` bytes is downloaded (_delta_cap)."""
        expect = Expectations(
            chain=self.chain_label,
            task_id=self.task_id,
            base_hash=recorded_base(state["collect"], self.base_dir, self.base_hash)[1],
            assignment_hash=self.assignment.hash(),
            registered_hotkeys=registered,
            deadline_block=state["collect"]["deadline"],
            max_artifact_bytes=cap,
            max_manifest_bytes=self.settings.evaluation.max_manifest_bytes,
        )
        commitment = Commitment(entry["hotkey"], r, entry["digest"], entry["block"])
        got = fetch_submission(
            self.store, commitment, expect, dest_dir=self.state_dir / "artifacts" / str(r)
        )
        if isinstance(got, Rejected):
            return False, _rejection(got.code, got.rejection, got.reason)
        fetched = dict(path=str(got.artifact_path.relative_to(self.state_dir)), size=got.size)
        fetched.update(artifact_sha256=got.artifact_sha256, block=entry["block"])
        return True, {**fetched, "tiebreak": entry["tiebreak"]}

    def _evaluate_files(self, r: int, seed: int, state: dict) -> tuple[dict, str]:
        """Outcome records of the fetched files, and the eval set's digest."""
        fetched = state["fetch"]["fetched"]
        base_dir, base_hash = recorded_base(state["collect"], self.base_dir, self.base_hash)
        model, layout, tokenizer = self._loaded(base_dir)
        s, e = self.settings, self.settings.evaluation
        eval_set = self.eval_set(tokenizer, seed)
        evaluator = Evaluator(model, layout, eval_set, device=e.device)
        entries = [
            Entry(h, f["artifact_sha256"], f["block"], f["tiebreak"]) for h, f in fetched.items()
        ]
        outcomes = evaluate_round(
            evaluator,
            {h: self.state_dir / f["path"] for h, f in fetched.items()},
            layout=layout,
            assignment=self.assignment,
            max_bytes=min(max_delta_bytes(layout, self.assignment), e.max_artifact_bytes),
            expected_base_hash=base_hash,
            expected_round=r,
            entries=entries,
            general_tolerance=e.general_tolerance,
            min_improvement=s.min_improvement,
            similarity_threshold=s.similarity_threshold,
            function_threshold=s.function_threshold,
            confidence=e.confidence,
            domain_name=self.domain_spec,
            history=self._history(r, layout),
            history_fingerprints=load_fingerprints(
                self.state_dir, self.rounds, r, HISTORY_ROUNDS, self._sketch_secret()
            ),
            secret=self._sketch_secret(),
            original_general=self._original_general(base_hash, eval_set),
            cumulative_tolerance=s.cumulative_general_tolerance,
            task_id=self.task_id,
        )
        kept = {h: o for h, o in outcomes.items() if o.sketch}
        save_round(
            self.state_dir,
            r,
            {h: o.sketch for h, o in kept.items()},
            {h: o.fingerprint for h, o in kept.items() if o.fingerprint},
        )
        return {h: _outcome_record(o) for h, o in outcomes.items()}, eval_set.digest()

    def _original_general(self, base_hash: str, eval_set) -> list[float] | None:
        """The task's original base's general losses on this eval set (cached per eval set), or
        None while the round builds on that base itself (protocol.round.drift)."""
        if self.lineage is None or base_hash == self.lineage.task_base_hash:
            return None
        return original_general_losses(
            self.lineage.task_base, eval_set, cache_dir=self.state_dir / "original_general",
            device=self.settings.evaluation.device,
        )  # fmt: skip

    def _history(self, r: int, layout) -> dict:
        """Sketches of the deltas this validator read in the last HISTORY_ROUNDS rounds, as
        copy-detection originals: "round q: hotkey" -> (Entry, Sketch) (validator.history)."""
        cap = min(
            max_delta_bytes(layout, self.assignment), self.settings.evaluation.max_artifact_bytes
        )

        def read(path, sha256):
            return read_delta_untrusted(
                path, layout=layout, assignment=self.assignment, max_bytes=cap,
                expected_sha256=sha256,
            )[1]  # fmt: skip

        secret = self._sketch_secret()
        return load_history(self.state_dir, self.rounds, r, HISTORY_ROUNDS, secret, read)

    def eval_set(self, tokenizer, seed: int) -> EvalSet:
        """The round's held-out batches: domain batches from this validator's private held-out
        text (every document) when it has one, else from the domain's public test split."""
        heldout, e = self.settings.heldout, self.settings.evaluation
        specs = (heldout or self.domain_spec, list(self.general_specs))
        split = ALL if heldout else "test"
        return build_eval_set(tokenizer, *specs, seed, **e.eval_set_sizes(), domain_split=split)

    def _check_heldout(self) -> None:
        """Refuse a private held-out source that is missing, empty or too small now, not in a
        round; say in the start-up log where the scoring data comes from."""
        heldout, e = self.settings.heldout, self.settings.evaluation
        if not heldout:
            log.warning(
                "held-out data: the PUBLIC test split of %s; miners can train on it and outscore "
                "honest work: set heldout in [validator] to private text (docs/security.md)",
                self.domain_spec,
            )
            return
        tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        sizes = dict(seq_len=e.seq_len, max_tokens=e.max_tokens, batch_size=e.batch_size)
        blocks = heldout_blocks(tokenizer, heldout, **sizes, domain_batches=e.domain_batches)
        log.info(
            "held-out data: %s, private to this validator (%d blocks of %d tokens)",
            heldout, len(blocks), e.seq_len,
        )  # fmt: skip

    def _sketch_secret(self) -> bytes:
        return load_or_create_secret(self.state_dir / SECRET_FILE)

    def _loaded(self, base_dir: Path):
        """The round's base model, its expert layout and tokenizer, loaded once per base: deltas
        are applied and reverted in place, so the model is the base again after every round."""
        if self._base is None or self._base_loaded_from != base_dir:
            self._base = None  # free the previous round's model before loading the next
            model = load_model(base_dir, device=self.settings.evaluation.device)
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            self._base, self._base_loaded_from = (model, expert_layout(model), tokenizer), base_dir
        return self._base

    def _resolve_base(self, r: int) -> dict:
        """Round r's base as recorded at collect: {"dir", "digest"} (protocol.round.lineage)."""
        return base_record(self.lineage, r, self.base_dir, self.base_hash)

    def _previous_averages(self, r: int) -> tuple[int | None, dict[str, float]]:
        """The latest round before r that this validator scored, and its averages."""
        stems = [p.stem for p in (self.state_dir / "rounds").glob("*.json")]
        for q in sorted((int(x) for x in stems if x.isdigit() and int(x) < r), reverse=True):
            state = self.rounds.load(q)
            if "score" in state:
                return q, state["score"]["averages"]
        return None, {}

    def _require_landing(self, r: int, phase: str) -> None:
        """PhaseMissed unless a transaction sent now lands in round r's `phase`."""
        lo, hi = phase_bounds(self.schedule, r, phase)
        landing = self.chain.block() + 1
        if not lo <= landing <= hi:
            raise PhaseMissed(
                f"round {r}: weights go in blocks {lo}..{hi} (the {phase} phase); a transaction "
                f"now lands in block {landing}"
            )

    def _own_uid(self) -> int:
        me = normalise(self.hotkey)
        for m in self.chain.members():
            if normalise(m.hotkey) == me:
                return m.uid
        raise RoundError(f"validator {self.hotkey} is not registered: it has no uid to set from")

    def _weights_record(self, r: int, status: str, block: int | None, own: int) -> dict:
        held = self.chain.weights(r).get(own, {})
        on_chain = {str(uid): value for uid, value in sorted(held.items())}
        return {"status": status, "block": block, "on_chain": on_chain}

    # -- state ------------------------------------------------------------------------------

    @staticmethod
    def _need(state: dict, step: str, r: int) -> None:
        if step not in state:
            raise RoundError(f"round {r}: run {step}({r}) first")


# ----------------------------------------------------------------------------- helpers


def _check_args(domain_spec, general_specs, settings) -> None:
    if not isinstance(settings, ValidatorSettings):
        raise ValueError(f"settings must be ValidatorSettings, got {settings!r}")
    if not isinstance(domain_spec, str) or not domain_spec:
        raise ValueError("domain_spec is empty: name the data the deltas are scored on")
    if isinstance(general_specs, str) or not general_specs:
        raise ValueError("general_specs: give a list of at least one spec (the forgetting guard)")
    if settings.heldout and settings.heldout == domain_spec:
        raise ValueError(f"heldout {settings.heldout} is the task's data: miners train on it")


def _rejection(code: str, rejection: str, reason: str) -> dict:
    return {"value": 0.0, "code": code, "reason": reason, "rejection": rejection}


def _not_evaluated() -> dict:
    """The outcome record a weight-copying validator keeps for a delta it never measured."""
    return dict(
        value=0.0, code="not_evaluated", reason="weight copier: sets copied weights, measures "
        "nothing", rejection=None, duplicate_of=None, domain_lcb=None, domain_mean=None,
        general_mean=None,
    )  # fmt: skip


def _outcome_record(o) -> dict:
    """A validator.evaluate.Outcome as plain JSON-able data."""
    s = o.score
    return {
        "value": o.value,
        "code": o.code,
        "reason": o.reason,
        "rejection": o.rejection,
        "duplicate_of": o.duplicate.original if o.duplicate else None,
        "domain_lcb": s.domain_lcb,
        "domain_mean": s.domain_mean,
        "general_mean": s.general_mean,
    }


def build(ctx: RoleContext, section, task) -> Validator:
    """The validator a [validator] section describes, scoring on the task's data."""
    return Validator(
        ctx, domain_spec=task.domain, general_specs=task.general, state_dir=section.state_dir,
        settings=section.settings,
    )  # fmt: skip
