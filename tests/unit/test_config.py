"""moesaic.config (on protocol.config's machinery) and the `run` commands' torch-free parts: loading, overrides, validation,
dry-run output, the example configs, and where a starting role joins the schedule."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from moesaic.commands import merger
from moesaic.commands.roles import add_run
from moesaic.config import (
    check_runnable,
    describe,
    from_dict,
    load_config,
)
from protocol.config import apply_overrides
from protocol.round.runtime import connect, first_round
from protocol.round.schedule import Schedule

ROOT = Path(__file__).resolve().parents[2]
KEY = "0x" + "ab" * 32
REGISTRY = "0x" + "12" * 20


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    merger.register(sub)
    for role in ("miner", "validator"):
        add_run(sub.add_parser(role).add_subparsers(required=True), role)
    return parser


def _cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("name", ["devnet.toml", "testnet.toml"])
def test_example_configs_load_with_every_role(name):
    config = load_config(ROOT / "configs" / name)
    for role in ("miner", "validator", "merger"):
        assert config.role(role) is not None
    assert config.chain.kind == "evm"


def test_devnet_values():
    config = load_config(ROOT / "configs" / "devnet.toml")
    assert config.chain.rpc == "http://127.0.0.1:8545"
    assert config.store.uri == "http://127.0.0.1:8600"
    assert config.chain.chain_id == 31337
    assert config.miner.train.lr == 8e-5
    assert config.miner.strategy == "honest" and config.task.follow_checkpoints
    assert config.data == config.task.domain  # miner data defaults to the task's domain
    assert config.validator.settings.evaluation.domain_batches == 16
    assert config.validator.settings.min_improvement == 1e-3
    assert config.validator.settings.ema_alpha == 1.0  # the merger weights this round's scores
    assert config.run.rounds is None
    train = config.miner.train  # the round's budget is its shard: no token twice
    assert train.max_tokens == train.steps * train.batch_size * train.seq_len
    test = load_config(ROOT / "configs" / "devnet-test.toml")
    assert test.miner.train.lr == 1e-2 and test.task.base_dir == "runs/base-test"


@pytest.mark.parametrize(
    ("data", "key", "section"),
    [
        ({"chian": {}}, "chian", "the top level"),
        ({"chain": {"rcp": "x"}}, "rcp", "[chain]"),
        ({"miner": {"train": {"step": 3}}}, "step", "[miner.train]"),
        ({"validator": {"domain_batch": 3}}, "domain_batch", "[validator]"),
    ],
)
def test_unknown_key_is_named_with_its_section(data, key, section):
    with pytest.raises(ValueError, match=re.escape(f"unknown key '{key}' in {section};")):
        from_dict(data)


def test_flat_role_settings_land_in_settings():
    config = from_dict({"merger": {"state_dir": "s", "method": "diloco", "outer_lr": 1}})
    assert config.merger.state_dir == "s"
    assert config.merger.settings.method == "diloco"
    assert config.merger.settings.outer_lr == 1.0 and isinstance(
        config.merger.settings.outer_lr, float
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"chain": {"kind": "subtensor-evm"}}, r"\[chain\] kind 'subtensor-evm' is not supported"),
        ({"chain": {"kind": "solana"}}, r"\[chain\] kind must be one of"),
        ({"chain": {"registry": "0x12"}}, r"\[chain\] registry"),
        ({"chain": {"rpc": "localhost:8545"}}, r"\[chain\] rpc"),
        ({"store": {"uri": "ftp://x"}}, r"\[store\] uri"),
        ({"task": {"general": []}}, r"\[task\] general"),
        ({"task": {"task_id": "0"}}, r"task.task_id must be int"),
        ({"run": {"rounds": 0}}, r"\[run\] rounds"),
        ({"run": {"poll_s": -1}}, r"\[run\] poll_s"),
        ({"miner": {"train": {"steps": 0}}}, r"\[miner.train\].*train.steps"),
        ({"miner": {"train": {"lr": True}}}, r"miner.train.lr must be float"),
        ({"validator": {"ema_alpha": 2.0}}, r"\[validator\].*ema_alpha"),
        ({"merger": {"method": "sum"}}, r"\[merger\].*method"),
        ({"task": "x"}, r"\[task\] must be a table"),
    ],
)
def test_bad_values_are_refused_at_construction(data, message):
    with pytest.raises(ValueError, match=message):
        from_dict(data)


def test_overrides_parse_toml_literals():
    data = {"miner": {"train": {"lr": 1e-3}}, "run": {"rounds": 3}}
    out = apply_overrides(
        data,
        [
            "miner.train.lr=3e-3",
            "miner.work_dir=runs/m 1",
            'task.domain="corpus:code"',
            "task.general=['corpus:prose']",
            "miner.train.steps = 7",
            "run.rounds=null",
        ],
    )
    assert out["miner"]["train"] == {"lr": 3e-3, "steps": 7}
    assert out["miner"]["work_dir"] == "runs/m 1"  # a bare word is a string
    assert out["task"] == {"domain": "corpus:code", "general": ["corpus:prose"]}
    assert "rounds" not in out["run"]  # null: back to the default (forever)
    assert data == {"miner": {"train": {"lr": 1e-3}}, "run": {"rounds": 3}}  # input untouched
    assert from_dict(out).run.rounds is None


@pytest.mark.parametrize("bad", ["miner.train.lr", "=3", "miner..lr=3", "task.domain.x=1"])
def test_malformed_overrides_are_refused(bad):
    with pytest.raises(ValueError, match="override"):
        apply_overrides({"task": {"domain": "corpus:math"}}, [bad])


def test_override_then_validation(tmp_path):
    with pytest.raises(ValueError, match="train.steps"):
        load_config(ROOT / "configs" / "devnet.toml", ["miner.train.steps=-1"])


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[chain\n")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_config(path)


def test_dry_run_prints_paths_never_key_material(tmp_path, capsys):
    key_file = tmp_path / "hot.key"
    key_file.write_text(KEY + "\n")
    argv = ["--config", str(ROOT / "configs" / "devnet.toml"), "--dry-run"]
    argv += ["--set", f"chain.key_file={key_file}", "--set", f"store.key_file={key_file}"]
    for role in ("miner", "validator", "merger"):
        assert _cli([role, "run", *argv]) == 0
        out = capsys.readouterr().out
        assert f'key_file = "{key_file}"' in out
        assert KEY[2:] not in out and "abab" not in out
        assert f"[{role}]" in out
        assert all(f"[{other}]" not in out for other in {"miner", "validator", "merger"} - {role})


def test_dry_run_reloads_as_the_same_config(tmp_path, capsys):
    config = load_config(ROOT / "configs" / "devnet.toml", ["run.rounds=2"])
    path = tmp_path / "resolved.toml"
    path.write_text(describe(config))
    assert load_config(path) == config


def test_describe_redacts_store_credentials():
    config = from_dict({"store": {"uri": "s3://b/p?endpoint=http://h:1&secret_key=hunter2"}})
    text = describe(config)
    assert "hunter2" not in text and "secret_key=***" in text and "endpoint=http://h:1" in text
    text = describe(from_dict({"store": {"uri": "https://user:pw@blobs.example"}}))
    assert "pw@" not in text and "https://blobs.example" in text


def test_missing_role_section_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[task]\ndomain = "corpus:math"\n')
    with pytest.raises(ValueError, match=r"no \[merger\] section"):
        _cli(["merger", "run", "--config", str(path), "--dry-run"])


def test_check_runnable_is_the_run_time_check(tmp_path):
    base, assignment, key = tmp_path / "base", tmp_path / "a.json", tmp_path / "k"
    data = {
        "chain": {"key_file": str(key)},
        "task": {"base_dir": str(base), "assignment": str(assignment)},
        "miner": {},
    }
    config = from_dict(data)  # loads although nothing exists yet
    with pytest.raises(ValueError, match="placeholder zero address"):
        check_runnable(config, "miner")
    data["chain"]["registry"] = REGISTRY
    with pytest.raises(ValueError, match="missing on disk") as e:
        check_runnable(from_dict(data), "miner")
    assert str(base) in str(e.value) and str(key) in str(e.value)
    base.mkdir()
    assignment.write_text("{}")
    key.write_text(KEY)
    check_runnable(from_dict(data), "miner")
    with pytest.raises(ValueError, match=r"no \[validator\] section"):
        check_runnable(from_dict(data), "validator")


def test_bad_key_file_error_does_not_quote_the_key(tmp_path):
    key = tmp_path / "k"
    secret = "0x" + "cd" * 31 + "zz"  # almost a key: the error must not echo it
    key.write_text(secret)
    key.chmod(0o600)  # else refused for its mode before its contents are read
    config = from_dict({"chain": {"key_file": str(key), "registry": REGISTRY}})
    with pytest.raises(ValueError) as e:
        connect(config)
    assert str(key) in str(e.value) and "cdcd" not in str(e.value)


def test_first_round_joins_until_the_roles_last_phase():
    s = Schedule(start_block=10, train=4, commit=2, reveal=1, evaluate=1, weights=1, merge=1)
    assert first_round(s, 0, "commit") == 0  # before the schedule: round 0
    assert first_round(s, 10, "commit") == 0  # train
    assert first_round(s, 15, "commit") == 0  # commit
    assert first_round(s, 16, "commit") == 1  # reveal: too late to commit
    assert first_round(s, 18, "weights") == 0
    assert first_round(s, 19, "weights") == 1
    assert first_round(s, 19, "merge") == 0
    assert first_round(s, 20, "merge") == 1  # round 1 train


def test_merger_compose_tasks_load_and_survive_the_dry_run_round_trip(tmp_path):
    path = tmp_path / "merger.toml"
    path.write_text(
        '[merger]\nstate_dir = "m"\n'
        'compose = [{task_id = 1, assignment = "code.json", domain = "corpus:code"}]\n'
    )
    config = load_config(path)
    (task,) = config.merger.compose
    assert (task.task_id, task.assignment, task.domain) == (1, "code.json", "corpus:code")
    again = tmp_path / "again.toml"
    again.write_text(describe(config, "merger"))
    assert load_config(again).merger.compose == config.merger.compose
    path.write_text('[merger]\ncompose = [{task_id = 1, assignment = "c.json"}]\n')
    with pytest.raises(ValueError, match="domain"):
        load_config(path)


def test_miner_train_cli_passes_memory_options_to_the_job(monkeypatch, capsys):
    """`moesaic miner train --gradient-checkpointing --loss-chunk N` reaches the LocalJob; a
    chunked loss with several ranks is refused before any process starts."""
    import miner.distributed
    import miner.local
    from moesaic.cli import main

    jobs = []

    def fake_run_local(job, progress):  # the CLI's wiring only; training is tested elsewhere
        jobs.append(job)
        return dict(tokens=1, tokens_per_s=1.0, first_loss=1.0, last_loss=1.0, bytes=1,
                    sha256="0" * 64, out=job.out)  # fmt: skip

    monkeypatch.setattr(miner.local, "run_local", fake_run_local)
    args = ["miner", "train", "--model", "m", "--assignment", "a", "--data", "d", "--out", "o"]
    assert main([*args, "--gradient-checkpointing", "--loss-chunk", "64", "--quiet"]) == 0
    assert (jobs[-1].train.gradient_checkpointing, jobs[-1].train.loss_chunk) == (True, 64)
    assert main([*args, "--quiet"]) == 0
    assert (jobs[-1].train.gradient_checkpointing, jobs[-1].train.loss_chunk) == (False, 0)
    spawned = []
    monkeypatch.setattr(miner.distributed, "_spawned", lambda *a: spawned.append(a))
    assert main([*args, "--loss-chunk", "64", "--world-size", "2", "--quiet"]) != 0
    assert "loss_chunk (64) is single-process only" in capsys.readouterr().err
    assert not spawned
