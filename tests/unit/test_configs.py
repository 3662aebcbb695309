"""Every shipped config loads, validates and dry-runs for every role; and every `moesaic ...`
command the operator guides show is one the real command-line parser accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from moesaic.cli import build_parser, main
from moesaic.config import ROLES, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
GUIDES = sorted((ROOT / "docs" / "guides").glob("*.md"))


def test_the_templates_are_there():
    names = {p.name for p in CONFIGS}
    assert {"devnet.toml", "testnet.toml", "mainnet.toml"} <= names
    assert {p.name for p in GUIDES} >= {
        "miner.md",
        "validator.md",
        "subnet-owner.md",
        "checkpoints.md",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("role", ROLES)
def test_config_dry_runs_for_every_role(path, role, capsys):
    config = load_config(path)
    config.role(role)  # every shipped file serves all three roles
    assert main([role, "run", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for section in ("[chain]", "[store]", "[task]", "[run]", "[metrics]", f"[{role}]"):
        assert section in out
    assert "# sends as: " in out
    others = [r for r in ROLES if r != role]
    assert not any(f"\n[{r}]" in out for r in others)  # only the role's own section


def test_mainnet_template_uses_a_keystore_and_metrics():
    config = load_config(ROOT / "configs" / "mainnet.toml")
    assert config.chain.keystore and not config.chain.key_file
    assert config.metrics.port == 9100
    with pytest.raises(ValueError, match="placeholder zero address"):
        from moesaic.config import check_runnable

        check_runnable(config, "miner")


def test_a_typo_in_a_config_is_an_error(tmp_path):
    text = (
        (ROOT / "configs" / "mainnet.toml").read_text().replace("[metrics]\nport", "[metrics]\nprt")
    )
    path = tmp_path / "typo.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match="unknown key 'prt' in \\[metrics\\]"):
        load_config(path)


def _guide_commands() -> list[tuple[str, str]]:
    """(guide, command) for every `moesaic ...` line inside a fenced bash block."""
    found = []
    for guide in GUIDES:
        for block in re.findall(r"```bash\n(.*?)```", guide.read_text(), flags=re.S):
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                line = line.split("  #", 1)[0].strip()
                if line.startswith("moesaic "):
                    found.append((guide.name, line))
    return found


def test_guides_show_commands():
    commands = _guide_commands()
    assert len(commands) >= 20
    assert {g for g, _ in commands} == {p.name for p in GUIDES}


@pytest.mark.parametrize("guide,command", _guide_commands())
def test_guide_command_parses(guide, command):
    argv = shlex.split(command)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code == 0 and "--help" in argv:  # help prints and exits 0: valid by definition
            return
        pytest.fail(f"{guide}: `{command}` is not a valid command line (exit {e.code})")
    assert callable(args.handler)


def test_guide_config_commands_dry_run(capsys):
    """The `run --config ... --dry-run` lines of the guides run as shown, from the repo root."""
    ran = 0
    for guide, command in _guide_commands():
        argv = shlex.split(command)[1:]
        if "--dry-run" in argv:
            config = argv[argv.index("--config") + 1]
            argv[argv.index("--config") + 1] = str(ROOT / config)
            assert main(argv) == 0, f"{guide}: {command}"
            ran += 1
    assert ran >= 2
    assert "# sends as: " in capsys.readouterr().out
