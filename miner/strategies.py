"""How a miner produces a round's delta: honest training, and the cheaters (tests, devnet).

    produce(miner, job, wait) -> {"sha256", "bytes", "tokens", "first_loss", "last_loss"}

The Miner's train step calls its strategy's `produce` with the training job it would run
(model = this round's base, out = where the delta must be written) and writes down what comes
back; everything after (upload, manifest, commitment) is the same protocol for every strategy.
That is the point of the cheaters: they obey the protocol to the letter and must still earn
nothing, because the validators measure, not trust.

- Honest: train the assigned experts (miner.local.run_local).
- Lazy: ship random noise shaped like a real delta, without training.
- Copycat: a sybil's second hotkey. It reads its partner miner's delta of the round from the
  partner's work dir on disk (`copy_from`; with commit-then-reveal nothing is in the store to
  copy before the deadline) and ships it under its own key: an exact copy on even rounds, a
  slightly scaled and noised copy on odd rounds (to dodge an exact-digest check). The
  validators' duplicate rule (same sha256, or cosine similarity above the threshold to an
  earlier commitment) gives the credit to the earlier committer.
- Copier: the same sybil, disguised by function: its partner's experts with their hidden
  neurons permuted, up/down signs flipped and rescaled (different each round), which computes
  exactly what the partner's delta computes while its raw cosine to it is ~0. The validators'
  function fingerprint (protocol.artifact.fingerprint) still sees the same outputs.

The cheaters of issue 6 (tests/integration/test_cheats.py runs each against a validator):

- Replay: re-ship this miner's own delta of round r-1, bytes unchanged (so its metadata and
  manifest say round r-1: refused as wrong_round). Trains honestly when there is nothing to
  replay yet, so a devnet miner has a delta to replay from its second round on.
- Replay_relabel: the same old tensors rewritten with this round's metadata (round r, the base
  it trains on now). Nothing in the bytes betrays it; only what the validator measures does.
- General_harm: an honest delta scaled by HARM_SCALE, overshooting the domain's direction (the
  "bigger gain" miner); it forgets general text and the general guard zeroes it.
- Nan_some: an honest delta with NaN in a few rows of one expert (the rest intact, so most
  tokens would never meet them): the untrusted loader refuses any non-finite value.

The front-runner (issue 15; tests/integration/test_cheats.py, the devnet):

- Frontrunner: from the start of the round until shortly before the commit deadline, it
  watches the store for another miner's manifest of this round whose delta is there too (what
  a miner that uploads before the deadline exposes) and the chain for other miners'
  commitments. A stolen delta is re-signed under its own key and committed as soon as the
  commit phase opens (first, if the victim was slower); failing that, it commits the digest it
  saw on chain from another miner, the only thing visible under commit-then-reveal (its delta
  is then noise nobody fetches). Validators fetch by the committed digest: the manifest names
  the author's hotkey, so the front-runner is `not_committer` and the author keeps the credit.

The deleter (issue 15; the devnet):

- Deleter: ships noise, and from the commit deadline to the end of its round keeps trying to
  DELETE every object in the store it did not upload itself: the rivals' revealed deltas and
  manifests (to leave them `not_revealed` when validators fetch) and the merged checkpoints.
  The store removes only the uploader's own claim (protocol.storage.claims), so each attempt
  is answered 403 `not_owner`; what it tried and what the store answered is written to
  `rounds/<r>.deletions.json` in its work dir, where the devnet summary reads it.
Issue 15:

- Evalpool: honest training (the same steps, batch size and max_tokens) on everything public,
  the evaluation pool first: the data's packaged test split, which validators without private
  held-out text draw their batches from, then the train split if the test split is shorter than
  max_tokens. Against a validator scoring on that public pool it outscores honest work; against
  one with private held-out text (validator/settings.py `heldout`) it gains nothing
  (scripts/evalpool_gain.py measures both).

Cheats that break the protocol's flow rather than the delta (a commitment after the deadline,
an upload never committed, a commitment never uploaded, another key's manifest) are not
strategies: the miner's steps refuse them, so tests/integration/test_cheats.py does them with
the chain and store directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from miner import local
from miner.local import LocalJob, write_job_delta
from protocol.artifact.delta import snapshot_experts
from protocol.artifact.fingerprint import BaseExperts, equivalent_delta
from protocol.artifact.untrusted import read_delta_untrusted, read_header_untrusted
from protocol.identity.hashing import sha256_dir, sha256_file
from protocol.identity.keys import normalise
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, load_model
from protocol.ops.atomic import write_bytes_atomic, write_text_atomic
from protocol.round.manifest import MAX_JSON_BYTES, SignedManifest
from protocol.round.schedule import commit_deadline, phase_bounds
from protocol.round.state import RoundStore

log = logging.getLogger("moesaic.miner")

LAZY_NOISE = 0.05  # noise std as a share of each expert weight's std: "looks like a delta"
COPY_SCALE = 1.02  # the disguised copy: 2 % larger ...
COPY_NOISE = 0.01  # ... plus noise of 1 % of each tensor's std
COPY_POLL_S = 0.5
HARM_SCALE = 10.0  # general_harm: honest delta x10 (x3 already forgets ~0.25 nats on the test base)
NAN_ROWS = 2  # nan_some: rows of one expert tensor set to NaN
# The front-runner stops looking this many blocks before the commit deadline: its own
# commitment (one transaction, the next block) must still land in the commit phase.
FRONT_MARGIN = 2
FRONT_POLL_S = 0.5  # between looks when no `wait` advances the chain
EVALPOOL_SPLITS = ("test", "train")  # evalpool: the pool validators used to draw from, first


def honest(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Train the task's experts on the miner's data (the protocol's intended miner)."""
    return local.run_local(job, progress=not miner.quiet)


def lazy(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Random noise in the shape of a real delta, with honest-looking metadata."""

    model, layout, assignment, base_hash = _base(job)
    generator = torch.Generator().manual_seed(job.train.seed)
    noise = {}
    for key, w in snapshot_experts(model, layout, assignment).items():
        w = w.float().cpu()
        noise[key] = torch.randn(w.shape, generator=generator) * (LAZY_NOISE * float(w.std()))
    return _write(job, noise, base_hash, assignment, tokens=0)


def copycat(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """The partner miner's delta for this round, re-shipped (exact or disguised, by round)."""

    victim = _partner_delta(miner, job)
    if job.round % 2 == 0:
        tmp = Path(job.out).with_suffix(".copy.tmp")
        shutil.copyfile(victim, tmp)
        tmp.replace(job.out)
        log.info("copycat: round %d: exact copy of %s", job.round, victim.name)
        return _result(job, sha256_file(job.out), tokens=0)

    model, layout, assignment, base_hash = _base(job)
    meta, tensors = read_delta_untrusted(
        victim, layout=layout, assignment=assignment, max_bytes=victim.stat().st_size
    )
    generator = torch.Generator().manual_seed(job.train.seed)
    disguised = {}
    for key, t in tensors.items():
        t = t.float()
        noise = torch.randn(t.shape, generator=generator) * (COPY_NOISE * float(t.std()))
        disguised[key] = t * COPY_SCALE + noise
    log.info("copycat: round %d: scaled+noised copy of %s", job.round, victim.name)
    return _write(job, disguised, base_hash, assignment, tokens=meta.tokens)


def copier(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """The partner miner's delta for this round, its neurons permuted, sign-flipped and
    rescaled (protocol.artifact.fingerprint.equivalent_delta): the same function, new bytes."""

    victim = _partner_delta(miner, job)
    model, layout, assignment, base_hash = _base(job)
    meta, tensors = read_delta_untrusted(
        victim, layout=layout, assignment=assignment, max_bytes=victim.stat().st_size
    )
    generator = torch.Generator().manual_seed(job.train.seed)  # the round's seed: new each round
    disguised = equivalent_delta(tensors, BaseExperts(model, layout), generator)
    log.info("copier: round %d: permuted/flipped/rescaled copy of %s", job.round, victim)
    return _write(job, disguised, base_hash, assignment, tokens=meta.tokens)


def replay(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """This miner's delta of round r-1, re-shipped byte for byte (honest training if none)."""
    previous = _previous_delta(miner, job)
    if previous is None:
        return honest(miner, job, wait)
    tmp = Path(job.out).with_suffix(".replay.tmp")
    shutil.copyfile(previous, tmp)
    tmp.replace(job.out)
    log.info("replay: round %d: ships %s unchanged", job.round, previous.name)
    return _result(job, sha256_file(job.out), tokens=0)


def replay_relabel(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """The delta of round r-1 with round r's metadata (honest training if none)."""

    previous = _previous_delta(miner, job)
    if previous is None:
        return honest(miner, job, wait)
    _, layout, assignment, base_hash = _base(job)
    meta, tensors = read_delta_untrusted(
        previous, layout=layout, assignment=assignment, max_bytes=previous.stat().st_size
    )
    log.info("replay_relabel: round %d: %s relabelled", job.round, previous.name)
    return _write(job, tensors, base_hash, assignment, tokens=meta.tokens)


def general_harm(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """An honest delta scaled by HARM_SCALE: pushed far along the domain direction."""

    trained = honest(miner, job, wait)
    _, layout, assignment, base_hash = _base(job)
    out = Path(job.out)
    meta, tensors = read_delta_untrusted(
        out, layout=layout, assignment=assignment, max_bytes=out.stat().st_size
    )
    scaled = {k: t.float() * HARM_SCALE for k, t in tensors.items()}
    result = _write(job, scaled, base_hash, assignment, tokens=meta.tokens)
    return {**result, "first_loss": trained["first_loss"], "last_loss": trained["last_loss"]}


def nan_some(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """An honest delta with NaN in the first NAN_ROWS rows of its last tensor (sorted keys).

    write_delta refuses non-finite values, so the honest file is patched in place: the
    container stays valid and only those elements change.
    """

    trained = honest(miner, job, wait)
    out = Path(job.out)
    header, _ = read_header_untrusted(out)
    key = max(k for k in header if k != "__metadata__")
    info = header[key]
    nan = {"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}[info["dtype"]]
    row = len(nan) * math.prod(info["shape"][1:])
    raw = bytearray(out.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little") + info["data_offsets"][0]
    count = min(NAN_ROWS, info["shape"][0]) * row // len(nan)
    raw[start : start + count * len(nan)] = nan * count
    write_bytes_atomic(out, bytes(raw))
    log.info("nan_some: round %d: %d NaN values in %s", job.round, count, key)
    digest = hashlib.sha256(raw).hexdigest()
    return {**trained, "sha256": digest, "bytes": len(raw)}


def frontrunner(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Another miner's delta re-signed if the store exposes one before the deadline, else
    another miner's committed digest (recorded as `commit_digest`), else noise."""
    r, stop = job.round, phase_bounds(miner.schedule, job.round, "commit")[1] - FRONT_MARGIN
    looked: set[str] = set()  # store objects already read: each poll reads only new ones
    while True:
        block = miner.chain.block()
        stolen = exposed_submission(miner, r, looked)
        if stolen is not None:
            manifest, delta = stolen
            tmp = Path(job.out).with_suffix(".front.tmp")
            miner.store.get(
                manifest.artifact_sha256, tmp, expected_sha256=manifest.artifact_sha256,
                max_bytes=manifest.artifact_size,
            )  # fmt: skip
            tmp.replace(job.out)
            log.info("frontrunner: round %d: re-ships %s's exposed delta", r, manifest.hotkey)
            return _result(job, delta, tokens=manifest.tokens)
        me = normalise(miner.hotkey)
        others = [c for c in miner.chain.commitments(r) if normalise(c.hotkey) != me]
        if others:
            seen = min(others, key=lambda c: c.block)
            log.info("frontrunner: round %d: nothing in the store; commits %s's digest %s",
                     r, seen.hotkey, seen.digest[:16])  # fmt: skip
            return {**lazy(miner, job, wait), "commit_digest": seen.digest.lower()}
        if block >= stop:
            log.info("frontrunner: round %d: nothing to front-run; ships noise", r)
            return lazy(miner, job, wait)
        if wait is not None:
            wait(block + 1)  # a daemon polls one block; a test's ledger mines one
        else:
            time.sleep(FRONT_POLL_S)


def exposed_submission(miner, r: int, looked: set[str]) -> tuple[SignedManifest, str] | None:
    """(manifest, artifact sha256) of another key's round-r submission whose manifest and delta
    are both readable in the store now, or None. Reads the first bytes of each object not in
    `looked` (a manifest is small JSON; a delta's first bytes are a binary header length)."""
    me = normalise(miner.hotkey)
    for sha in list(miner.store.list()):
        if sha in looked:
            continue
        looked.add(sha)
        raw = miner.store.read_range(miner.store.object_uri(sha), 0, MAX_JSON_BYTES)
        try:
            m = SignedManifest.from_json(raw).manifest
        except (ValueError, TypeError):
            continue  # not a manifest (a delta, a checkpoint file)
        ours = m.round == r and m.task_id == miner.task_id and normalise(m.hotkey) != me
        if ours and miner.store.exists(m.artifact_sha256):
            return m, m.artifact_sha256
    return None


def deleter(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Noise, plus a background thread deleting the rivals' objects until the round ends."""
    produced = lazy(miner, job, wait)
    thread = threading.Thread(
        target=delete_rivals, args=(miner, job.round, produced["sha256"]),
        name=f"deleter-{job.round}", daemon=True,
    )  # fmt: skip
    thread.start()
    return produced


def delete_rivals(miner, r: int, own_delta: str) -> dict:
    """From round r's commit deadline to its last block, DELETE every store object that is not
    this miner's own delta or manifest; returns (and writes) {"attempts", "deleted", "answers"}.
    Never raises: an attacker's thread must not take the miner process down with it."""
    report = {"round": r, "attempts": 0, "deleted": 0, "answers": {}, "objects": []}
    out = miner.rounds_dir / f"{r}.deletions.json"
    start = commit_deadline(miner.schedule, r) + 1
    end = phase_bounds(miner.schedule, r, "merge")[1]
    tried: set[str] = set()
    try:
        while miner.chain.block() < start:
            time.sleep(FRONT_POLL_S)
        while miner.chain.block() <= end:
            for sha in list(miner.store.list()):
                if sha in tried or sha == own_delta or sha in _own_objects(miner):
                    continue
                if _own_manifest(miner, sha):  # this round's, before its reveal is recorded
                    continue
                tried.add(sha)
                report["attempts"] += 1
                report["objects"].append(sha)
                try:
                    miner.store.delete(sha)
                    report["deleted"] += 1
                    answer = "deleted"
                except Exception as e:  # noqa: BLE001 (the store's answer, whatever it is, is the record)
                    answer = getattr(e, "code", type(e).__name__)
                report["answers"][answer] = report["answers"].get(answer, 0) + 1
                write_text_atomic(out, json.dumps(report, indent=1) + "\n")
            time.sleep(FRONT_POLL_S)
    except Exception as e:  # noqa: BLE001 (see the docstring)
        report["error"] = repr(e)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    log.info("deleter: round %d: %d deletes tried, %d succeeded, answers %s",
             r, report["attempts"], report["deleted"], report["answers"])  # fmt: skip
    return report


def _own_objects(miner) -> set[str]:
    """Every object this miner recorded uploading, in any round (its deltas and manifests):
    deleting those is its own business, not an attack on a rival."""
    own: set[str] = set()
    for path in miner.rounds_dir.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(state, dict):
            continue
        own.add((state.get("trained") or {}).get("sha256"))
        revealed = state.get("revealed") or {}
        own.update((revealed.get(k) or {}).get("sha256") for k in ("delta", "manifest"))
    own.discard(None)
    return own


def _own_manifest(miner, sha: str) -> bool:
    """Whether object `sha` is a manifest signed by this miner (its own reveal)."""
    raw = miner.store.read_range(miner.store.object_uri(sha), 0, MAX_JSON_BYTES)
    try:
        return normalise(SignedManifest.from_json(raw).manifest.hotkey) == normalise(miner.hotkey)
    except (ValueError, TypeError):
        return False


def evalpool(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Train on the data's public test split (the old evaluation pool), then its train split."""
    return local.run_local(job, progress=not miner.quiet, splits=EVALPOOL_SPLITS)


STRATEGIES: dict[str, Callable] = {
    "honest": honest,
    "lazy": lazy,
    "copycat": copycat,
    "copier": copier,
    "replay": replay,
    "replay_relabel": replay_relabel,
    "general_harm": general_harm,
    "nan_some": nan_some,
    "frontrunner": frontrunner,
    "deleter": deleter,
    "evalpool": evalpool,
}


# ----------------------------------------------------------------------------- helpers


def _base(job: LocalJob):
    """(model, layout, assignment, base hash) of the job's base, on the CPU."""

    model = load_model(job.model, device="cpu")
    return model, expert_layout(model), Assignment.load(job.assignment), sha256_dir(job.model)


def _write(job: LocalJob, tensors: dict, base_hash: str, assignment, tokens: int) -> dict:
    return _result(job, write_job_delta(job, tensors, base_hash, assignment, tokens), tokens)


def _result(job: LocalJob, sha256: str, tokens: int) -> dict:
    # No training happened: the losses are NaN so nobody mistakes them for a measurement.
    nan = float("nan")
    size = Path(job.out).stat().st_size
    return dict(sha256=sha256, bytes=size, tokens=tokens, first_loss=nan, last_loss=nan)


def _previous_delta(miner, job: LocalJob) -> Path | None:
    """This miner's own delta file of round r-1, if it still has one."""
    path = Path(miner.rounds_dir) / f"{job.round - 1}.delta.safetensors"
    return path if job.round > 0 and path.is_file() else None


def _partner_delta(miner, job: LocalJob) -> Path:
    """The partner miner's delta file of this round (`copy_from`/rounds/<r>.delta.safetensors),
    once its partner has committed it.

    Polls until the file exists and the partner's round record shows its commitment, so the
    copy is the later commitment; gives up at the round's commit deadline with a RuntimeError
    (nothing to copy). Only the file's presence is required: a partner that never commits still
    gets copied, at the deadline.
    """
    if not getattr(miner, "copy_from", None):
        raise RuntimeError(
            f"{miner.strategy}: no copy_from work dir to copy a partner's delta from"
        )
    r = job.round
    path = Path(miner.copy_from) / "rounds" / f"{r}.delta.safetensors"
    partner = RoundStore(miner.copy_from)
    deadline = commit_deadline(miner.schedule, r)
    while miner.chain.block() < deadline - 1:
        if path.is_file() and partner.load(r).get("committed"):
            return path
        time.sleep(COPY_POLL_S)
    if path.is_file():
        return path
    raise RuntimeError(f"{miner.strategy}: round {r}: {path} did not appear before the deadline")
