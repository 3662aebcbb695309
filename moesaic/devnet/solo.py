"""The devnet's solo baseline: one honest miner alone, its own deltas applied to its own line.

What the network is compared with: the same miner working alone. After the rounds, the devnet
trains one more honest miner for as many rounds, with the first honest miner's settings (steps,
learning rate, batch, token budget, encoding) and its round seeds (miner.node.round_seed), on a
shard of its own (protocol.round.shards.shard_key with the solo line's own hotkey, SOLO_LABEL),
each round on its own previous result (round 0: the original base). Each round's delta is added
to that line with protocol.artifact.export, as the merger exports a checkpoint, and merged with
nobody's. No chain, store or scoring is involved, so the solo line is the same in every run of
the same commit (the network's line is not: README, "What varies between runs").

    solo/rounds/<r>.delta.safetensors     the round's delta (what a miner would upload)
    solo/checkpoints/<r>/                 the solo line after round r (a HF directory)
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

from eth_account import Account
from safetensors.torch import load_file

from miner.local import LocalJob, run_local
from miner.node import round_seed
from protocol.artifact.export import export_checkpoint
from protocol.artifact.wire import decode_delta
from protocol.identity.hashing import sha256_dir
from protocol.round.shards import shard_key
from protocol.settings import TrainSettings

log = logging.getLogger("moesaic.devnet")

SOLO_LABEL = "solo"


def solo_hotkey() -> str:
    """The solo line's hotkey: derived like the cast's keys (run.make_cast), never registered;
    only its shard key uses it, so its shards differ from every miner's."""
    key = hashlib.sha256(f"moesaic-devnet:{SOLO_LABEL}".encode()).digest()
    return Account.from_key(key).address


def solo_job(
    folder: Path, line: Path, r: int, *, settings: TrainSettings, data: str, assignment: Path,
    base_hash: str, task_id: int,
) -> LocalJob:  # fmt: skip
    """Round r's training job: as an honest miner's (miner.node.Miner._job), on `line`."""
    return LocalJob(
        model=str(line),
        assignment=str(assignment),
        data=data,
        out=str(folder / "rounds" / f"{r}.delta.safetensors"),
        train=replace(settings, seed=round_seed(settings.seed, r)),
        round=r,
        assignment_base=base_hash,
        feedback_dir=str(folder / "rounds"),
        shard=shard_key(task_id, solo_hotkey(), r),
    )


def run_solo(folder: Path, config, base: Path, assignment: Path, rounds: int) -> list[dict]:
    """Train the solo line for `rounds` rounds with a miner's `config` (moesaic.config.Config:
    its [miner.train] settings, its data, the task id); per round {round, path, tokens,
    first_loss, last_loss}, path being the line's checkpoint after the round."""
    settings = config.miner.train
    (folder / "rounds").mkdir(parents=True, exist_ok=True)
    base_hash = sha256_dir(base)
    line, rows = base, []
    for r in range(rounds):
        job = solo_job(
            folder, line, r, settings=settings, data=config.data, assignment=assignment,
            base_hash=base_hash, task_id=config.task.task_id,
        )  # fmt: skip
        trained = run_local(job, progress=False)
        delta = decode_delta(load_file(job.out), settings.encoding)
        out = folder / "checkpoints" / str(r)
        info = {"round": r, "decision": "solo", "delta": Path(job.out).name, "shard": job.shard}
        export_checkpoint(line, delta, out, info=info, overwrite=True)
        log.info("solo round %d: loss %.4f -> %.4f", r, trained["first_loss"], trained["last_loss"])
        rows.append(
            {"round": r, "path": str(out), "tokens": trained["tokens"],
             "first_loss": trained["first_loss"], "last_loss": trained["last_loss"]}
        )  # fmt: skip
        line = out
    return rows
