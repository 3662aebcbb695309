"""The miner's round as named steps: train -> sign_manifest -> commit -> reveal.

    ctx = RoleContext(chain, store, schedule=schedule, chain_label="subtensor:42", task_id=0,
                      base_dir="runs/base", assignment_path="runs/math.json", signer=signer)
    miner = Miner(ctx, data_spec="corpus:math", work_dir="runs/miner0", train=TrainSettings())
    summary = miner.run_round(3, wait=poll_until)   # tests pass FakeLedger.mine_to

Commit, then reveal: nothing that identifies the delta leaves the machine before the round's
commit deadline but the commitment itself (the sha256 of the signed manifest). The manifest is
signed locally, its digest committed in the commit phase, and only once the chain is past the
deadline are the delta and the manifest uploaded (the reveal, in the reveal phase), so nobody
can copy or re-sign the work and commit it first (docs/security.md, "Front-running"). Content
addressing binds the reveal to the commitment: the committed digest names the manifest's
bytes, the manifest (signed by this hotkey) names the delta's sha256.

The miner is composed, not configured by inheritance: its chain client, store and signer come
in the RoleContext (protocol.round.context); `build` makes one from a [miner] config section.
Each step is a resumable step of protocol.round.state, like the validator's and the merger's:
it records its result in `work_dir/rounds/<round>.json` (written atomically) before the next
step starts, and a recorded step first asks the world (the file on disk, the store, the chain)
whether its record still holds, through the step's `holds` check. A miner killed anywhere and
restarted on the same work_dir therefore resumes without redoing finished work or losing the
round:

- killed while training: the delta is written atomically and not yet recorded -> retrain;
- killed after signing, before recording: the manifest file on disk is reused when it makes
  the same claims, so it is never re-signed (sr25519 signatures are randomised, and a new
  signature is a new commitment digest); once recorded, the delta's and the manifest's bytes
  are fixed (the digest names them) and are never retrained or re-signed;
- killed after sending the commit, before recording: the chain's commitments for the round
  already hold this hotkey's, so it is recorded and never sent twice;
- killed during the reveal: the reveal runs again and puts whatever the store lacks; a file
  lost after the reveal is fetched back from the store.

TrainSettings: protocol/settings.py.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from miner.feedback import ResidualStore, drop_unsent
from miner.local import LocalJob
from miner.strategies import STRATEGIES
from protocol.artifact.delta import METADATA_KEY, DeltaMeta
from protocol.artifact.untrusted import read_header_untrusted
from protocol.chain import ChainError, Commitment
from protocol.identity.hashing import sha256_file
from protocol.identity.keys import normalise
from protocol.ops.atomic import remove_stale_temps, write_bytes_atomic
from protocol.round.context import RoleContext
from protocol.round.manifest import Manifest, SignedManifest, manifest_for, sign
from protocol.round.schedule import Schedule, WrongPhase, phase_bounds, position
from protocol.round.shards import shard_key
from protocol.round.state import RoundStore, round_step
from protocol.settings import TrainSettings
from protocol.storage import ObjectRef, StorageError
from protocol.storage.transfer import with_name

log = logging.getLogger("moesaic.miner")

# The steps' records in rounds/<round>.json (protocol.round.state.RoundStore, version 1): what
# this miner has done for the round, null until done.
RECORDS = (
    "trained",  # delta file name, sha256, bytes, tokens, losses, DeltaMeta
    "manifest",  # manifest file name, commitment digest, the delta's ObjectRef-to-be (not uploaded)
    "committed",  # the committed digest and the block it landed in
    "revealed",  # the delta's and the manifest's ObjectRefs in the store, the block at the reveal
)


class RoundConflict(RuntimeError):
    """The round's recorded state disagrees with the chain or the store; a human should look."""


def round_seed(seed: int, rnd: int) -> int:
    """The training seed of a round: stable for (seed, round), different across rounds."""
    digest = hashlib.sha256(f"moesaic-round-seed:{seed}:{rnd}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # 31 bits: every RNG we feed accepts it


def check_commit_phase(schedule: Schedule, rnd: int, next_block: int) -> None:
    """Raise WrongPhase unless a transaction landing in `next_block` is in rnd's commit phase."""
    first, last = phase_bounds(schedule, rnd, "commit")
    if first <= next_block <= last:
        return
    pos = position(schedule, next_block)
    where = f"round {pos.round}, {pos.phase} phase" if pos else "before the first round"
    when = "not open yet" if next_block < first else "over"
    raise WrongPhase(
        f"round {rnd}'s commit phase is {when}: commitments must land in blocks {first}..{last}, "
        f"the next block is {next_block} ({where})"
    )


def check_reveal_phase(schedule: Schedule, rnd: int, block: int) -> None:
    """Raise WrongPhase unless the chain (at `block`) is past rnd's commit deadline: before it,
    an upload would expose the delta to anyone who could still commit it as theirs."""
    deadline = phase_bounds(schedule, rnd, "commit")[1]
    if block <= deadline:
        raise WrongPhase(
            f"round {rnd}: the commit phase is not over (chain at block {block}, deadline "
            f"{deadline}); revealing now would let others commit this delta as theirs"
        )


def _commit_digest(state: dict) -> str:
    """What the round commits: the signed manifest's digest (the front-runner strategy's
    produce names another miner's instead, recorded with its delta)."""
    return state["trained"].get("commit_digest") or state["manifest"]["digest"]


def _delta_meta(path: Path) -> dict:
    """The DeltaMeta fields our own freshly written delta carries (read from its header)."""
    header, _ = read_header_untrusted(path)
    return asdict(DeltaMeta.from_json(header["__metadata__"][METADATA_KEY]))


class Miner:
    """One hotkey's miner: runs a round as named steps, each resumable after a crash."""

    def __init__(
        self,
        ctx: RoleContext,
        *,
        data_spec: str,
        work_dir: str | Path,
        train: TrainSettings,
        quiet: bool = False,
        strategy: str = "honest",
        copy_from: str | Path | None = None,
    ):
        if ctx.signer is None:
            raise ValueError("a miner signs its manifests: the RoleContext needs a signer")
        self.chain, self.store, self.signer = ctx.chain, ctx.store, ctx.signer
        self.hotkey = self.signer.identity
        self._hotkey_norm = normalise(self.hotkey)  # EVM addresses compare case-insensitively
        chain_key = self.chain.identity()
        if chain_key is None:
            raise ValueError("the chain client is read-only (no key): a miner must send commits")
        if normalise(chain_key) != normalise(self.hotkey):
            raise ValueError(
                f"signer {self.hotkey} is not the chain client's key {chain_key}: the manifest "
                "and the commitment must come from the same hotkey"
            )
        if not isinstance(train, TrainSettings):
            raise ValueError("train must be a TrainSettings")
        self.base_dir, self.assignment_path = ctx.base_dir, ctx.assignment_path
        if not (self.base_dir / "config.json").is_file():
            raise ValueError(f"base_dir {self.base_dir} is not a model directory (no config.json)")
        if not self.assignment_path.is_file():
            raise ValueError(f"assignment file {self.assignment_path} not found")
        self.schedule, self.chain_label, self.task_id = ctx.schedule, ctx.chain_label, ctx.task_id
        self.data_spec, self.settings, self.quiet = data_spec, train, quiet
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy {strategy!r} unknown; one of {sorted(STRATEGIES)}")
        self.strategy, self._produce = strategy, STRATEGIES[strategy]
        self.copy_from = Path(copy_from) if copy_from else None  # copycat/copier's partner
        # With a lineage, each round trains on the latest merged checkpoint (protocol.round.lineage);
        # without one, every round trains on base_dir.
        self.lineage = ctx.lineage
        self.rounds = RoundStore(work_dir, records=RECORDS)
        self.rounds_dir = Path(work_dir) / "rounds"
        self.rounds_dir.mkdir(parents=True, exist_ok=True)

    # -- the round --------------------------------------------------------------------------
    def run_round(self, round: int, wait: Callable[[int], None]) -> dict:
        """Do round `round` end to end; `wait(block)` returns once the chain reached block - 1
        (a daemon polls; tests mine). Safe to call again after a crash: done steps are skipped."""
        self.commit_round(round, wait)
        self.wait_for_reveal_phase(round, wait)
        self.reveal(round)
        return self.summary(round)

    def commit_round(self, round: int, wait: Callable[[int], None]) -> dict:
        """The round up to its commitment (train, sign, commit): nothing is uploaded. Tests
        that run several miners on one ledger commit them all, then reveal them all."""
        self.wait_for_round(round, wait)
        self.train(round, wait)
        self.sign_manifest(round)
        self.wait_for_commit_phase(round, wait)
        self.commit(round)
        return self.summary(round)

    # -- steps ------------------------------------------------------------------------------
    def wait_for_round(self, round: int, wait: Callable[[int], None]) -> None:
        """With a lineage, wait until round `round` has started: only then is its base (the
        previous round's checkpoint, if one was merged) final. No-op once trained."""
        if self.lineage is None or self.rounds.load(round)["trained"]:
            return
        start = phase_bounds(self.schedule, round, "train")[0]
        if self.chain.block() < start:
            log.info("round %d: waiting for the round to start (block %d)", round, start)
            wait(start + 1)

    def base_for(self, round: int) -> tuple[Path, str | None]:
        """(model directory, its digest or None) that round `round` trains on."""
        if self.lineage is None:
            return self.base_dir, None
        return self.lineage.base_for(round)

    def train(self, round: int, wait: Callable[[int], None] | None = None) -> Path:
        """Step 1: train the assignment's experts on the data's train split and write
        rounds/<round>.delta.safetensors; records sha256, size, tokens, losses and metadata.

        Skipped when recorded and the file still has the recorded sha256. Once the manifest is
        signed the bytes are fixed: a lost or damaged file is fetched back from the store after
        the reveal, never retrained.
        """
        self._train(round, wait)
        return self._file(round, "delta.safetensors")

    def sign_manifest(self, round: int) -> str:
        """Step 2: sign the manifest of the trained delta once and write the signed JSON to
        rounds/<round>.manifest.json; returns and records its sha256, the commitment digest.
        Uploads nothing: the delta's uri is the one the store will give it. Never re-signs a
        recorded manifest."""
        return self._sign_manifest(round)["digest"]

    def wait_for_commit_phase(self, round: int, wait: Callable[[int], None]) -> None:
        """Block until a transaction would land in round's commit phase (no-op once committed
        or already inside it); commit() refuses if the phase has passed."""
        if self.rounds.load(round)["committed"]:
            return
        first = phase_bounds(self.schedule, round, "commit")[0]
        if self.chain.block() + 1 < first:
            log.info("round %d: waiting for the commit phase (block %d)", round, first)
            wait(first)

    def commit(self, round: int) -> int:
        """Step 3: commit the manifest digest on chain in the round's commit phase; returns and
        records the block. Never commits twice: a commitment of this hotkey already on chain
        (sent before a crash) is recorded instead."""
        return self._commit(round)["block"]

    def wait_for_reveal_phase(self, round: int, wait: Callable[[int], None]) -> None:
        """Block until the chain is past round's commit deadline (no-op once revealed)."""
        if self.rounds.load(round)["revealed"]:
            return
        deadline = phase_bounds(self.schedule, round, "commit")[1]
        if self.chain.block() <= deadline:
            log.info(
                "round %d: waiting for the commit deadline (block %d) to reveal", round, deadline
            )
            wait(deadline + 1)

    def reveal(self, round: int) -> ObjectRef:
        """Step 4, once the chain is past the commit deadline: put the delta and the signed
        manifest in the store (validators fetch them after the reveal phase); returns the
        delta's ObjectRef. Refused (WrongPhase) before the deadline. Idempotent: skipped while
        the store holds both objects."""
        return ObjectRef(**self._reveal(round)["delta"])

    # -- the steps' bodies and checks (protocol.round.state.round_step) ---------------------
    def _delta_intact(self, r: int, state: dict) -> bool:
        """train's record holds while the delta file has the recorded sha256. Once the manifest
        is signed its bytes are fixed (the commitment names them): a lost or changed file is
        fetched back from the store after the reveal, and is an error before it. False: train
        again (nothing was signed yet, nothing left the machine)."""
        path, sha256 = self._file(r, "delta.safetensors"), state["trained"]["sha256"]
        if path.is_file() and sha256_file(path) == sha256:
            log.info("round %d: delta already trained (%s)", r, sha256[:16])
            return True
        if state["manifest"]:
            self._restore(r, state, path, sha256, state["trained"]["bytes"], "delta")
            return True
        return False

    @round_step("train", record="trained", holds="_delta_intact")
    def _train(self, r: int, state: dict, wait: Callable[[int], None] | None = None) -> dict:
        path = self._file(r, "delta.safetensors")
        remove_stale_temps(path)  # a kill mid-write leaves a hidden temp; it is never used
        drop_unsent(ResidualStore(self.rounds_dir), r, self._never_sent)
        job = self._job(r, path)
        log.info("round %d: %s miner, %d steps (seed %d) on %s", r, self.strategy,
                 job.train.steps, job.train.seed, job.model)  # fmt: skip
        result = self._produce(self, job, wait)
        log.info("round %d: trained %d tokens, loss %.4f -> %.4f",
                 r, result["tokens"], result["first_loss"], result["last_loss"])  # fmt: skip
        record = {
            "file": path.name,
            "sha256": result["sha256"],
            "bytes": result["bytes"],
            "tokens": result["tokens"],
            "first_loss": result["first_loss"],
            "last_loss": result["last_loss"],
            "tokens_per_s": result.get("tokens_per_s"),
            "meta": _delta_meta(path),
        }
        if result.get("commit_digest"):  # the front-runner's: another miner's digest
            record["commit_digest"] = result["commit_digest"]
        return record

    def _manifest_intact(self, r: int, state: dict) -> bool:
        """A recorded manifest is never signed again: a lost file is fetched back from the
        store after the reveal, and is an error before it (the digest would change)."""
        path, digest = self._file(r, "manifest.json"), state["manifest"]["digest"]
        if not (path.is_file() and sha256_file(path) == digest):
            self._restore(r, state, path, digest, None, "manifest")
        return True

    @round_step("sign_manifest", after=_train, record="manifest", holds="_manifest_intact")
    def _sign_manifest(self, r: int, state: dict) -> dict:
        delta, path = self._file(r, "delta.safetensors"), self._file(r, "manifest.json")
        if not delta.is_file() or sha256_file(delta) != state["trained"]["sha256"]:
            raise RoundConflict(f"{delta} is not the delta recorded for round {r}: run train({r})")
        ref = ObjectRef(
            state["trained"]["sha256"],
            state["trained"]["bytes"],
            with_name(self.store.object_uri(state["trained"]["sha256"]), delta.name),
        )
        data = self._signed_bytes(self._manifest(state, ref), path)
        digest = hashlib.sha256(data).hexdigest()
        log.info("round %d: manifest %s signed (not uploaded before the deadline)", r, digest[:16])
        uri = with_name(self.store.object_uri(digest), path.name)
        return {"file": path.name, "digest": digest, "uri": uri, "delta": asdict(ref)}

    @round_step("commit", after=_sign_manifest, record="committed")
    def _commit(self, r: int, state: dict) -> dict:
        digest = _commit_digest(state)
        landed = self._landed(r, digest)
        if landed is None:
            block = self._send_commit(r, digest)
        else:
            log.info("round %d: commitment already on chain (block %d)", r, landed.block)
            block = landed.block
        log.info("round %d: committed %s in block %d", r, digest[:16], block)
        return {"digest": digest, "block": block}

    def _revealed_stored(self, r: int, state: dict) -> bool:
        """The reveal holds while the store has both objects; else it runs again."""
        revealed = state["revealed"]
        return all(self.store.exists(revealed[k]["sha256"]) for k in ("delta", "manifest"))

    @round_step("reveal", after=_commit, record="revealed", holds="_revealed_stored")
    def _reveal(self, r: int, state: dict) -> dict:
        block = self.chain.block()
        check_reveal_phase(self.schedule, r, block)
        last = phase_bounds(self.schedule, r, "reveal")[1]
        if block > last:  # still worth it: a validator may not have fetched yet
            log.warning("round %d: revealing after the reveal phase (block %d > %d): "
                        "validators that already fetched score it not_revealed", r, block, last)  # fmt: skip
        refs = {}
        for what, suffix, sha256 in (
            ("delta", "delta.safetensors", state["trained"]["sha256"]),
            ("manifest", "manifest.json", state["manifest"]["digest"]),
        ):
            path = self._file(r, suffix)
            if not path.is_file() or sha256_file(path) != sha256:
                raise RoundConflict(f"round {r}: {path} no longer holds the committed {what}")
            ref = self.store.put(path, name=path.name, progress=not self.quiet and what == "delta")
            if ref.sha256 != sha256:
                raise RoundConflict(f"round {r}: {path} changed while uploading ({ref.sha256})")
            refs[what] = asdict(ref)
        log.info("round %d: revealed %s (delta %s) at block %d",
                 r, refs["manifest"]["sha256"][:16], refs["delta"]["uri"], block)  # fmt: skip
        return {**refs, "block": block}

    def summary(self, round: int) -> dict:
        """What the round produced, from its recorded state."""
        s = self.rounds.load(round)
        t, m, c = s["trained"] or {}, s["manifest"] or {}, s["committed"] or {}
        v = s["revealed"] or {}
        return {
            "round": round,
            "delta_sha256": t.get("sha256"),
            "bytes": t.get("bytes"),
            "tokens": t.get("tokens"),
            "first_loss": t.get("first_loss"),
            "last_loss": t.get("last_loss"),
            "tokens_per_s": t.get("tokens_per_s"),
            "delta_uri": (m.get("delta") or {}).get("uri"),
            "manifest_digest": m.get("digest"),
            "manifest_uri": m.get("uri"),
            "commit_block": c.get("block"),
            "reveal_block": v.get("block"),
        }

    # -- helpers ----------------------------------------------------------------------------
    def _file(self, rnd: int, suffix: str) -> Path:
        return self.rounds_dir / f"{rnd}.{suffix}"

    def _job(self, rnd: int, out: Path) -> LocalJob:
        model, _ = self.base_for(rnd)
        return LocalJob(
            model=str(model),
            assignment=str(self.assignment_path),
            data=self.data_spec,
            out=str(out),
            train=replace(self.settings, seed=round_seed(self.settings.seed, rnd)),
            round=rnd,
            assignment_base=self.lineage.task_base_hash if self.lineage else "",
            feedback_dir=str(self.rounds_dir),
            optimizer_dir=str(self.rounds_dir) if self.settings.keep_optimizer else "",
            shard=shard_key(self.task_id, self.hotkey, rnd),
        )

    def _restore(
        self, r: int, state: dict, path: Path, sha256: str, size: int | None, what: str
    ) -> Path:
        """Fetch a lost or changed file whose bytes are fixed back from the store: possible only
        once revealed (before, nothing left this machine)."""
        if not state["revealed"]:
            raise RoundConflict(
                f"round {r}: {path} no longer holds the signed {what} {sha256[:16]} and it was "
                f"never revealed; it cannot be re-signed (the digest would change): remove "
                f"{self.rounds.path(r)} to start the round over"
            )
        log.warning("round %d: %s file missing or changed; fetching it back", r, what)
        try:
            uri = self.store.object_uri(sha256)
            return self.store.get(uri, path, expected_sha256=sha256, max_bytes=size or 1 << 20)
        except StorageError as e:
            raise RoundConflict(
                f"round {r}: the revealed {what} is gone from disk and store ({e}); "
                f"remove {self.rounds.path(r)} to start the round over"
            ) from e

    def _manifest(self, state: dict, ref: ObjectRef) -> Manifest:
        meta = DeltaMeta(**state["trained"]["meta"])
        return manifest_for(
            meta, ref, chain=self.chain_label, task_id=self.task_id, hotkey=self.hotkey
        )

    def _signed_bytes(self, manifest: Manifest, path: Path) -> bytes:
        """The signed manifest's bytes: an existing file making exactly these claims (signed
        before a crash) is reused; otherwise sign once and write atomically."""
        if path.is_file():
            try:
                existing = SignedManifest.from_json(path.read_bytes())
            except ValueError:
                existing = None
            if existing and existing.manifest == manifest and existing.verify():
                return path.read_bytes()
        data = sign(manifest, self.signer).to_json().encode()
        write_bytes_atomic(path, data)
        return data

    def _send_commit(self, rnd: int, digest: str) -> int:
        """Send the commitment in the commit phase; the block it landed in."""
        check_commit_phase(self.schedule, rnd, self.chain.block() + 1)
        try:
            return self.chain.commit(rnd, digest)
        except ChainError as e:
            # A commit sent before a crash (still pending then) can land between our look at
            # the chain and this send: the chain refuses the second, and ours is what counts.
            landed = self._landed(rnd, digest) if e.code == "AlreadyCommitted" else None
            if landed is None:
                raise
            return landed.block

    def _never_sent(self, rnd: int) -> bool:
        """Round rnd's delta reached no validator: not committed, here or on chain, and its
        commit phase is over (a conflicting commitment counts as sent: keep, don't guess)."""
        state, commit_last = self.rounds.load(rnd), phase_bounds(self.schedule, rnd, "commit")[1]
        if state["committed"] or self.chain.block() <= commit_last:
            return False
        try:
            return not (state["manifest"] and self._landed(rnd, _commit_digest(state)))
        except RoundConflict:
            return False

    def _landed(self, rnd: int, digest: str) -> Commitment | None:
        """This hotkey's commitment for the round if the chain holds one (ours must match)."""
        mine = [c for c in self.chain.commitments(rnd) if normalise(c.hotkey) == self._hotkey_norm]
        if not mine:
            return None
        if mine[0].digest.lower() != digest:
            raise RoundConflict(
                f"round {rnd}: the chain holds commitment {mine[0].digest} from {self.hotkey}, "
                f"not the recorded manifest {digest}; a round commits once"
            )
        return mine[0]


def build(ctx: RoleContext, section, task) -> Miner:
    """The miner a [miner] section describes (its data defaults to the task's domain)."""
    return Miner(
        ctx, data_spec=section.data or task.domain, work_dir=section.work_dir,
        train=section.train, quiet=True, strategy=section.strategy,
        copy_from=section.copy_from or None,
    )  # fmt: skip
