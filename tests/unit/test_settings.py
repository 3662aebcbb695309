"""One source per setting: the settings groups, the CLI flags made from their fields, the flat
TOML keys of the role sections, and the one-way imports moesaic -> roles -> protocol."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from miner.local import JOB_INTERNAL, LocalJob
from moesaic.cli import build_parser, main
from moesaic.config import from_dict
from protocol.config import add_flags, build, field_docs, from_flags
from protocol.settings import EvalSettings, TrainSettings
from validator.settings import ValidatorSettings

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ["--model", "m", "--assignment", "a.json", "--data", "corpus:math", "--out", "d.st"]


def _train_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["miner", "train", *REQUIRED, *extra])


def _distributed_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser, LocalJob, exclude=JOB_INTERNAL)
    return parser.parse_args([*REQUIRED, *extra])


def test_flags_made_from_fields_have_the_dataclass_defaults():
    expected = LocalJob(model="m", assignment="a.json", data="corpus:math", out="d.st")
    for args in (_train_args(), _distributed_args()):
        for f in fields(TrainSettings):
            assert getattr(args, f.name) == getattr(TrainSettings(), f.name), f.name
        assert from_flags(LocalJob, args) == expected


def test_the_encoding_default_is_the_same_in_toml_cli_and_local_job():
    toml = from_dict({"miner": {}}).miner.train.encoding
    cli = from_flags(LocalJob, _train_args()).train.encoding
    job = LocalJob(model="m", assignment="a", data="d", out="o").train.encoding
    assert toml == cli == job == TrainSettings().encoding == "bfloat16"


def test_flags_set_every_field_and_carry_its_docstring():
    args = _train_args("--steps", "7", "--lr", "3e-3", "--encoding", "int8", "--round", "4",
                       "--gradient-checkpointing", "--loss-chunk", "64")  # fmt: skip
    job = from_flags(LocalJob, args)
    assert job.round == 4 and job.assignment_base == "" and job.feedback_dir == ""
    assert job.train == TrainSettings(
        steps=7, lr=3e-3, encoding="int8", gradient_checkpointing=True, loss_chunk=64
    )
    sub = build_parser()._subparsers._group_actions[0].choices["miner"]
    train = sub._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train._actions}
    assert helps["lr"].startswith(field_docs(TrainSettings)["lr"])
    assert "(default: %(default)s)" in helps["lr"]
    assert "~20 %% slower" in helps["gradient_checkpointing"]  # escaped for argparse
    assert helps["model"] == field_docs(LocalJob)["model"]
    assert not {"assignment_base", "feedback_dir"} & set(helps)


def test_a_bad_flag_value_is_a_usage_error_naming_its_key(capsys):
    with pytest.raises(SystemExit):
        main(["miner", "train", *REQUIRED, "--lr", "-1"])
    assert "train.lr must be a positive finite number" in capsys.readouterr().err


def test_eval_settings_are_flat_keys_of_the_validator_and_merger_sections():
    config = from_dict(
        {
            "validator": {"domain_batches": 3, "ema_alpha": 0.5, "device": "cuda"},
            "merger": {"domain_batches": 5, "method": "diloco", "confidence": 0.9},
        }
    )
    v, m = config.validator.settings, config.merger.settings
    assert v == ValidatorSettings(EvalSettings(domain_batches=3, device="cuda"), ema_alpha=0.5)
    assert (m.evaluation.domain_batches, m.evaluation.confidence, m.method) == (5, 0.9, "diloco")
    with pytest.raises(ValueError, match=r"\[validator\]: domain_batches must be an integer >= 2"):
        from_dict({"validator": {"domain_batches": 1}})
    with pytest.raises(ValueError, match="unknown key 'evaluation'"):
        build(ValidatorSettings, {"evaluation": {}})  # the group has no table of its own


def test_eval_set_sizes_are_what_build_eval_set_takes():
    import inspect

    from protocol.moe.evaluate import build_eval_set

    params = inspect.signature(build_eval_set).parameters
    assert set(EvalSettings().eval_set_sizes()) <= set(params)


def test_the_strategy_names_a_config_accepts_are_the_strategies_a_miner_has():
    from miner.settings import STRATEGY_NAMES
    from miner.strategies import STRATEGIES

    assert tuple(STRATEGIES) == STRATEGY_NAMES


def test_copying_strategies_need_a_partner_work_dir_and_only_they_take_one():
    from miner.settings import MinerConfig

    assert MinerConfig(strategy="copier", copy_from="runs/m0").copy_from == "runs/m0"
    with pytest.raises(ValueError, match="'copier' needs copy_from"):
        MinerConfig(strategy="copier")
    with pytest.raises(ValueError, match="copy_from is only for"):
        MinerConfig(strategy="honest", copy_from="runs/m0")
    with pytest.raises(ValueError, match="another miner's work_dir"):
        MinerConfig(work_dir="runs/m1", strategy="copycat", copy_from="runs/m1/")
