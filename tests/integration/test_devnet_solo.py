"""The devnet's solo baseline (moesaic/devnet/solo.py): one honest miner alone, round after round.

.venv/bin/python -m pytest -q tests/integration/test_devnet_solo.py     (~1 min on 2 cores)

Two solo rounds on the session's test base with the devnet's miner config (fewer steps): each
round trains on the solo line's previous checkpoint, on its own shard, and the checkpoint is
that line plus the round's delta, exported like the merger's (a HF directory that loads).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from storage_fixtures import ROOT

from miner.node import round_seed
from moesaic.config import load_config
from moesaic.devnet.solo import run_solo, solo_hotkey, solo_job
from protocol.artifact.wire import decode_delta
from protocol.identity.hashing import sha256_dir
from protocol.round.shards import shard_key

HONEST0 = "0x" + "ab" * 20  # any miner's hotkey: the solo line's shards are never a miner's


def test_solo_jobs_use_the_miners_round_seeds_on_a_shard_of_their_own(tmp_path):
    config = load_config(ROOT / "configs" / "devnet-test.toml")
    settings = config.miner.train
    jobs = [
        solo_job(tmp_path, tmp_path / f"line{r}", r, settings=settings, data=config.data,
                 assignment=tmp_path / "a.json", base_hash="0" * 64, task_id=0)
        for r in range(3)
    ]  # fmt: skip
    assert [j.train.seed for j in jobs] == [round_seed(settings.seed, r) for r in range(3)]
    assert [j.train.steps for j in jobs] == [settings.steps] * 3
    assert len({j.shard for j in jobs}) == 3  # a new shard every round
    assert jobs[1].shard == shard_key(0, solo_hotkey(), 1)
    assert jobs[1].shard != shard_key(0, HONEST0, 1)
    assert jobs[2].model == str(tmp_path / "line2") and jobs[2].assignment_base == "0" * 64
    assert solo_hotkey() == solo_hotkey() and solo_hotkey().startswith("0x")


@pytest.mark.slow
def test_the_solo_line_applies_its_own_delta_to_its_own_previous_result(
    tmp_path, test_base, test_assignment
):
    from transformers import AutoModelForCausalLM

    config = load_config(
        ROOT / "configs" / "devnet-test.toml",
        ["miner.train.steps=4", "miner.train.max_tokens=8192", "miner.train.encoding=float32"],
    )
    rows = run_solo(tmp_path / "solo", config, test_base, test_assignment, rounds=2)
    assert [row["round"] for row in rows] == [0, 1]
    first, second = (tmp_path / "solo" / "checkpoints" / str(r) for r in (0, 1))
    assert [row["path"] for row in rows] == [str(first), str(second)]
    # Round 0 builds on the original base, round 1 on round 0's result (never a merge).
    assert json.loads((first / "moesaic.json").read_text())["base_hash"] == sha256_dir(test_base)
    provenance = json.loads((second / "moesaic.json").read_text())
    assert provenance["base_hash"] == sha256_dir(first)
    assert provenance["info"]["decision"] == "solo" and provenance["info"]["round"] == 1
    assert provenance["info"]["shard"] == shard_key(0, solo_hotkey(), 1)

    # The round-1 checkpoint is round 0's plus round 1's delta, expert by expert.
    delta = decode_delta(load_file(str(tmp_path / "solo" / "rounds" / "1.delta.safetensors")),
                         "float32")  # fmt: skip
    before = AutoModelForCausalLM.from_pretrained(first).state_dict()
    after = AutoModelForCausalLM.from_pretrained(second).state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(".experts." in k for k in changed)  # only the task's experts moved
    moved = sum(float((after[k] - before[k]).abs().sum()) for k in changed)
    assert moved == pytest.approx(sum(float(d.abs().sum()) for d in delta.values()), rel=1e-3)
    assert all(row["tokens"] > 0 and row["last_loss"] > 0 for row in rows)
