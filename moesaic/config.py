"""A role process's whole TOML configuration: the shared sections and each role's own, loaded,
overridden (`--set section.key=value`), validated, and shown for `--dry-run`.

    config = load_config("configs/devnet.toml", overrides=["miner.train.lr=3e-3"])
    print(describe(config, "miner"))    # what `moesaic miner run --dry-run` prints; no key contents

It sits above the roles because it composes their sections: [chain], [store], [task], [run] and
[metrics] come from protocol.config, [miner] from miner/settings.py, [validator] from
validator/settings.py, [merger] from merger/settings.py. The machinery (type checks, flat
groups, overrides, describe) is protocol.config's. Torch-free, so `--dry-run` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merger.settings import MergerConfig
from miner.settings import MinerConfig
from protocol.config import (
    SHARED,
    ZERO_ADDRESS,
    ChainConfig,
    MetricsConfig,
    RunConfig,
    StoreConfig,
    TaskConfig,
    apply_overrides,
    build,
    check_paths,
    describe_tables,
    load_toml,
)
from validator.settings import ValidatorConfig

ROLES = ("miner", "validator", "merger")


@dataclass(frozen=True)
class Config:
    """One process's whole configuration; role sections are optional, each role needs its own."""

    chain: ChainConfig = field(default_factory=ChainConfig)
    """[chain]"""
    store: StoreConfig = field(default_factory=StoreConfig)
    """[store]"""
    task: TaskConfig = field(default_factory=TaskConfig)
    """[task]"""
    run: RunConfig = field(default_factory=RunConfig)
    """[run]"""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """[metrics]"""
    miner: MinerConfig | None = None
    """[miner], needed by `moesaic miner run`."""
    validator: ValidatorConfig | None = None
    """[validator], needed by `moesaic validator run`."""
    merger: MergerConfig | None = None
    """[merger], needed by `moesaic merger run`."""

    def role(self, name: str) -> MinerConfig | ValidatorConfig | MergerConfig:
        """The role's section, or a ValueError saying the file lacks it."""
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; one of {ROLES}")
        section = getattr(self, name)
        if section is None:
            raise ValueError(f"the config has no [{name}] section")
        return section

    @property
    def data(self) -> str:
        """The miner's training data spec (its own, else the task's domain)."""
        return (self.miner and self.miner.data) or self.task.domain


def from_dict(data: dict) -> Config:
    """A validated Config from parsed TOML; unknown keys and wrong types name key and section."""
    return build(Config, data)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file, apply `section.key=value` overrides, validate."""
    return from_dict(apply_overrides(load_toml(path), overrides))


def describe(config: Config, role: str | None = None) -> str:
    """The resolved config as TOML text (for --dry-run): shared sections plus `role`'s (all
    roles when None). Key files appear as paths only; store uri credentials are redacted."""
    return describe_tables(config, [*SHARED, *([role] if role else ROLES)])


def check_runnable(config: Config, role: str) -> None:
    """Run-time checks a role needs before touching the network: its section, a real registry
    (kind "evm"), a key source that can sign for the chain's kind, and the base and assignment
    on disk."""
    config.role(role)
    c = config.chain
    if c.kind == "subtensor":
        # [chain] already refused a keystore here; a key_file's type shows when it is read.
        if not (c.key_file or c.wallet_name):
            raise ValueError("[chain] wallet_name or key_file is required to send extrinsics")
        check_paths(_required_paths(config))
        return
    if c.registry == ZERO_ADDRESS:
        raise ValueError("[chain] registry is the placeholder zero address: set the real one")
    if c.wallet_name:
        raise ValueError(
            "[chain] wallet_name: a Bittensor hotkey is an sr25519 key and cannot sign EVM "
            "transactions; for kind = 'evm' set key_file or keystore instead"
        )
    if not (c.key_file or c.keystore):
        raise ValueError("[chain] key_file or keystore is required to send transactions")
    check_paths(_required_paths(config))


def _required_paths(config: Config) -> list[str]:
    keys = [k for k in (config.chain.key_file, config.chain.keystore) if k]
    paths = [*keys, config.task.base_dir, config.task.assignment]
    paths += [t.assignment for t in (config.merger.compose if config.merger else [])]
    return paths + ([config.store.key_file] if config.store.key_file else [])


__all__ = [
    "ROLES",
    "Config",
    "check_runnable",
    "describe",
    "from_dict",
    "load_config",
]
