"""The miner's round as named steps: train -> upload -> publish_manifest -> commit.

    ctx = RoleContext(chain, store, schedule=schedule, chain_label="subtensor:42", task_id=0,
                      base_dir="runs/base", assignment_path="runs/math.json", signer=signer)
    miner = Miner(ctx, data_spec="corpus:math", work_dir="runs/miner0", train=TrainSettings())
    summary = miner.run_round(3, wait=poll_until)   # tests pass FakeLedger.mine_to

The miner is composed, not configured by inheritance: its chain client, store and signer come
in the RoleContext (protocol.round.context); `build` makes one from a [miner] config section.
Each step is a resumable step of protocol.round.state, like the validator's and the merger's:
it records its result in `work_dir/rounds/<round>.json` (written atomically) before the next
step starts, and a recorded step first asks the world (the file on disk, the store, the chain)
whether its record still holds, through the step's `holds` check. A miner killed anywhere and
restarted on the same work_dir therefore resumes without redoing finished work or losing the
round:

- killed while training: the delta is written atomically and not yet recorded -> retrain;
- killed after upload, delta file lost: the recorded object is fetched back from the store
  (the bytes are fixed once they left the machine: a manifest may already name them);
- killed after signing, before recording: the manifest file on disk is reused when it makes
  the same claims, so it is never re-signed (sr25519 signatures are randomised, and a new
  signature is a new commitment digest);
- killed after sending the commit, before recording: the chain's commitments for the round
  already hold this hotkey's, so it is recorded and never sent twice.

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
from protocol.round.state import RoundStore, round_step
from protocol.settings import TrainSettings
from protocol.storage import ObjectRef, StorageError

log = logging.getLogger("moesaic.miner")

# The steps' records in rounds/<round>.json (protocol.round.state.RoundStore, version 1): what
# this miner has done for the round, null until done.
RECORDS = (
    "trained",  # delta file name, sha256, bytes, tokens, losses, DeltaMeta
    "uploaded",  # the delta's ObjectRef in the store
    "manifest",  # manifest file name, commitment digest, its uri in the store
    "committed",  # the committed digest and the block it landed in
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
        self.wait_for_round(round, wait)
        self.train(round, wait)
        self.upload(round)
        self.publish_manifest(round)
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

        Skipped when recorded and the file still has the recorded sha256. Once uploaded, the
        bytes are fixed: a lost or damaged file is fetched back from the store, never retrained.
        """
        self._train(round, wait)
        return self._file(round, "delta.safetensors")

    def upload(self, round: int) -> ObjectRef:
        """Step 2: put the delta in the store; records its ObjectRef. Idempotent: skipped while
        the store holds the recorded object."""
        return ObjectRef(**self._upload(round))

    def publish_manifest(self, round: int) -> str:
        """Step 3: sign the manifest of the uploaded delta once, write the signed JSON to
        rounds/<round>.manifest.json and put those exact bytes in the store; returns and
        records their sha256, the commitment digest. Never re-signs a recorded manifest."""
        return self._publish_manifest(round)["digest"]

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
        """Step 4: commit the manifest digest on chain in the round's commit phase; returns and
        records the block. Never commits twice: a commitment of this hotkey already on chain
        (sent before a crash) is recorded instead."""
        return self._commit(round)["block"]

    # -- the steps' bodies and checks (protocol.round.state.round_step) ---------------------
    def _delta_intact(self, r: int, state: dict) -> bool:
        """train's record holds while the delta file has the recorded sha256; once uploaded, a
        lost or changed file is fetched back from the store (its bytes are fixed: a manifest
        may already name them). False: train again."""
        path, sha256 = self._file(r, "delta.safetensors"), state["trained"]["sha256"]
        if path.is_file() and sha256_file(path) == sha256:
            log.info("round %d: delta already trained (%s)", r, sha256[:16])
            return True
        if state["uploaded"]:
            self._restore_delta(r, state, path)
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
        return {
            "file": path.name,
            "sha256": result["sha256"],
            "bytes": result["bytes"],
            "tokens": result["tokens"],
            "first_loss": result["first_loss"],
            "last_loss": result["last_loss"],
            "tokens_per_s": result.get("tokens_per_s"),
            "meta": _delta_meta(path),
        }

    def _delta_stored(self, r: int, state: dict) -> bool:
        return self.store.exists(state["uploaded"]["sha256"])

    @round_step("upload", after=_train, record="uploaded", holds="_delta_stored")
    def _upload(self, r: int, state: dict) -> dict:
        path = self._file(r, "delta.safetensors")
        if not path.is_file() or sha256_file(path) != state["trained"]["sha256"]:
            raise RoundConflict(f"{path} is not the delta recorded for round {r}: run train({r})")
        ref = self.store.put(path, name=path.name, progress=not self.quiet)
        if state["uploaded"] and ref != ObjectRef(**state["uploaded"]):
            raise RoundConflict(f"round {r}: re-upload gave {ref}, recorded {state['uploaded']}")
        log.info("round %d: delta uploaded to %s", r, ref.uri)
        return asdict(ref)

    def _manifest_stored(self, r: int, state: dict) -> bool:
        """A recorded manifest is re-put from its unchanged file if it left the store; it is
        never signed again (raises where that is impossible)."""
        self._ensure_stored(self._file(r, "manifest.json"), state["manifest"]["digest"])
        return True

    @round_step("publish_manifest", after=_upload, record="manifest", holds="_manifest_stored")
    def _publish_manifest(self, r: int, state: dict) -> dict:
        path = self._file(r, "manifest.json")
        data = self._signed_bytes(self._manifest(state), path)
        ref = self.store.put(path, name=path.name)
        digest = hashlib.sha256(data).hexdigest()
        if ref.sha256 != digest:
            raise RoundConflict(f"{path} changed while uploading (store has {ref.sha256})")
        log.info("round %d: manifest %s published", r, digest[:16])
        return {"file": path.name, "digest": digest, "uri": ref.uri}

    @round_step("commit", after=_publish_manifest, record="committed")
    def _commit(self, r: int, state: dict) -> dict:
        digest = state["manifest"]["digest"]
        landed = self._landed(r, digest)
        if landed is None:
            block = self._send_commit(r, digest)
        else:
            log.info("round %d: commitment already on chain (block %d)", r, landed.block)
            block = landed.block
        log.info("round %d: committed %s in block %d", r, digest[:16], block)
        return {"digest": digest, "block": block}

    def summary(self, round: int) -> dict:
        """What the round produced, from its recorded state."""
        s = self.rounds.load(round)
        t, m, c = s["trained"] or {}, s["manifest"] or {}, s["committed"] or {}
        return {
            "round": round,
            "delta_sha256": t.get("sha256"),
            "bytes": t.get("bytes"),
            "tokens": t.get("tokens"),
            "first_loss": t.get("first_loss"),
            "last_loss": t.get("last_loss"),
            "tokens_per_s": t.get("tokens_per_s"),
            "delta_uri": (s["uploaded"] or {}).get("uri"),
            "manifest_digest": m.get("digest"),
            "manifest_uri": m.get("uri"),
            "commit_block": c.get("block"),
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
        )

    def _restore_delta(self, r: int, state: dict, path: Path) -> Path:
        ref = ObjectRef(**state["uploaded"])
        log.warning("round %d: delta file missing or changed; fetching %s", r, ref.uri)
        try:
            return self.store.get(ref, path, expected_sha256=ref.sha256, max_bytes=ref.size)
        except StorageError as e:
            raise RoundConflict(
                f"round {r}: the uploaded delta is gone from disk and store ({e}); "
                f"remove {self.rounds.path(r)} to start the round over"
            ) from e

    def _manifest(self, state: dict) -> Manifest:
        meta = DeltaMeta(**state["trained"]["meta"])
        ref = ObjectRef(**state["uploaded"])
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

    def _ensure_stored(self, path: Path, digest: str) -> None:
        """Re-put a recorded manifest whose object left the store, from its unchanged file."""
        if self.store.exists(digest):
            return
        if not path.is_file() or sha256_file(path) != digest:
            raise RoundConflict(
                f"manifest {digest[:16]} is gone from the store and {path} no longer holds it; "
                "it cannot be re-signed (the digest would change)"
            )
        self.store.put(path, name=path.name)

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
            return not (state["manifest"] and self._landed(rnd, state["manifest"]["digest"]))
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
