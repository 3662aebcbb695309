"""How a miner produces a round's delta: honest training, and the cheaters (tests, devnet).

    produce(miner, job, wait) -> {"sha256", "bytes", "tokens", "first_loss", "last_loss"}

The Miner's train step calls its strategy's `produce` with the training job it would run
(model = this round's base, out = where the delta must be written) and writes down what comes
back; everything after (upload, manifest, commitment) is the same protocol for every strategy.
That is the point of the cheaters: they obey the protocol to the letter and must still earn
nothing, because the validators measure, not trust.

- Honest: train the assigned experts (miner.local.run_local).
- Lazy: ship random noise shaped like a real delta, without training.
- Copycat: wait for another miner's commitment in the commit phase, fetch its delta, and ship
  it under its own key: an exact copy on even rounds, a slightly scaled and noised copy on odd
  rounds (to dodge an exact-digest check). The validators' duplicate rule (same sha256, or
  cosine similarity above the threshold to an earlier commitment) gives the credit to the
  earlier committer.

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
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from miner import local
from miner.local import LocalJob, write_job_delta
from protocol.artifact.delta import snapshot_experts
from protocol.artifact.untrusted import read_delta_untrusted, read_header_untrusted
from protocol.identity.hashing import sha256_dir, sha256_file
from protocol.identity.keys import normalise
from protocol.moe.experts import Assignment
from protocol.moe.model import expert_layout, load_model
from protocol.ops.atomic import write_bytes_atomic
from protocol.round.schedule import phase_bounds
from protocol.round.submissions import Expectations, Rejected, fetch_submission

log = logging.getLogger("moesaic.miner")

LAZY_NOISE = 0.05  # noise std as a share of each expert weight's std: "looks like a delta"
COPY_SCALE = 1.02  # the disguised copy: 2 % larger ...
COPY_NOISE = 0.01  # ... plus noise of 1 % of each tensor's std
COPY_POLL_S = 0.5
HARM_SCALE = 10.0  # general_harm: honest delta x10 (x3 already forgets ~0.25 nats on the test base)
NAN_ROWS = 2  # nan_some: rows of one expert tensor set to NaN
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
    """Another miner's delta for this round, re-shipped (exact or disguised, by round)."""

    victim = _first_other_submission(miner, job, wait)
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


def evalpool(miner, job: LocalJob, wait: Callable[[int], None] | None) -> dict:
    """Train on the data's public test split (the old evaluation pool), then its train split."""
    return local.run_local(job, progress=not miner.quiet, splits=EVALPOOL_SPLITS)


STRATEGIES: dict[str, Callable] = {
    "honest": honest,
    "lazy": lazy,
    "copycat": copycat,
    "replay": replay,
    "replay_relabel": replay_relabel,
    "general_harm": general_harm,
    "nan_some": nan_some,
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


def _first_other_submission(miner, job: LocalJob, wait: Callable[[int], None] | None) -> Path:
    """The artifact of the earliest other commitment of round r that verifies, fetched.

    Waits (polling the chain) from the commit phase on until one exists; gives up at the
    commit deadline with a RuntimeError (there was nobody to copy).
    """
    r = job.round
    first, last = phase_bounds(miner.schedule, r, "commit")
    if wait is not None:
        wait(first)
    me = normalise(miner.hotkey)
    expect = Expectations(
        chain=miner.chain_label,
        task_id=miner.task_id,
        base_hash=sha256_dir(job.model),
        assignment_hash=Assignment.load(job.assignment).hash(),
        registered_hotkeys=[m.hotkey for m in miner.chain.members()],
        deadline_block=last,
        max_artifact_bytes=1 << 34,
        max_manifest_bytes=1 << 20,
    )
    dest = miner.rounds_dir / f"{r}.victims"
    while miner.chain.block() < last:
        others = [c for c in miner.chain.commitments(r) if normalise(c.hotkey) != me]
        for c in sorted(others, key=lambda c: c.block):
            got = fetch_submission(miner.store, c, expect, dest_dir=dest)
            if not isinstance(got, Rejected):
                return got.artifact_path
        time.sleep(COPY_POLL_S)
    raise RuntimeError(f"copycat: round {r}: no other commitment to copy before the deadline")
