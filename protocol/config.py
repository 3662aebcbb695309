"""Typed role configuration: TOML files for operators, dotted CLI overrides, a `--dry-run` view.

    config = load_config("configs/devnet.toml", overrides=["miner.train.lr=3e-3"])
    print(describe(config))      # what `moesaic miner run --dry-run` prints; never key contents

Every section is a frozen dataclass validated at construction, with a docstring under every
field. Unknown keys are errors that name the key and its section (a typo must not silently fall
back to a default). Whether paths exist is a run-time question (`check_paths`), not a load-time
one, so a config can be checked on a machine that has not built the base yet. Key files are
read only by `read_key`, at run time; no function here returns or prints their contents.

Torch-free: the role settings imported below are plain dataclasses in torch-free modules.
"""

from __future__ import annotations

import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from merger.node import MergerSettings
from miner.settings import TrainSettings
from validator.node import ValidatorSettings

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
ZERO_ADDRESS = "0x" + "0" * 40  # the templates' placeholder registry; refused at run time
ROLES = ("miner", "validator", "merger")
# How a miner produces its delta (miner/strategies.py): "honest" is the protocol; the others are
# the cheaters the devnet and tests run to show they earn nothing.
STRATEGIES = ("honest", "lazy", "copycat", "replay", "replay_relabel", "general_harm", "nan_some")


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ChainConfig:
    """Which chain and registry contract the role talks to, and the key it sends with."""

    kind: str = "evm"
    """Chain backend; only "evm" (a MoesaicRegistry contract over JSON-RPC) so far."""
    rpc: str = "http://127.0.0.1:8545"
    """JSON-RPC endpoint of the EVM node."""
    registry: str = ZERO_ADDRESS
    """0x address of the MoesaicRegistry contract (the zero address is a placeholder)."""
    key_file: str = ""
    """File holding the sending key as 0x + 64 hex; read at run time, never printed."""
    keystore: str = ""
    """Or: an eth-account keystore JSON (Web3 Secret Storage) holding the sending key."""
    keystore_password_env: str = "MOESAIC_KEYSTORE_PASSWORD"
    """Environment variable holding the keystore's password."""
    keystore_password_file: str = ""
    """Or: a file whose first line is the keystore's password (then the variable is ignored)."""
    wallet_name: str = ""
    """Or: a Bittensor wallet by name (btcli's --wallet.name); its hotkey is loaded, never the
    coldkey. Bittensor hotkeys are sr25519: they sign for subtensor chains, not kind "evm"."""
    wallet_hotkey: str = "default"
    """The wallet's hotkey (btcli's --wallet.hotkey)."""
    wallet_path: str = "~/.bittensor/wallets"
    """Where wallets live (btcli's --wallet.path)."""
    chain_id: int | None = None
    """Expected EVM chain id; when set, a node reporting another id is refused."""

    def __post_init__(self):
        if self.kind != "evm":
            raise ValueError(f"[chain] kind must be 'evm', got {self.kind!r}")
        sources = [k for k in ("key_file", "keystore", "wallet_name") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError(
                f"[chain] set exactly one key source, got {' and '.join(sources)} "
                "(key_file, keystore or wallet_name)"
            )
        _url(self.rpc, "[chain] rpc", ("http", "https", "ws", "wss"))
        if not _ADDRESS.fullmatch(self.registry):
            raise ValueError(f"[chain] registry must be a 0x address, got {self.registry!r}")
        if self.chain_id is not None and self.chain_id <= 0:
            raise ValueError(f"[chain] chain_id must be positive, got {self.chain_id}")


@dataclass(frozen=True)
class StoreConfig:
    """Where artifacts and manifests are uploaded and fetched from."""

    uri: str = "http://127.0.0.1:8600"
    """Store uri: file:///dir, http(s)://host:port (blob server) or s3://bucket/prefix."""
    key_file: str = ""
    """Key file signing uploads to a blob server (0x hex or sr25519:<uri>); empty: the chain key."""

    def __post_init__(self):
        if not self.uri:
            raise ValueError("[store] uri must not be empty")
        if "://" in self.uri:
            _url(self.uri, "[store] uri", ("file", "http", "https", "s3"))


@dataclass(frozen=True)
class TaskConfig:
    """The task every role of this network works on; all roles must agree on it."""

    task_id: int = 0
    """The registry's task id (signed into every manifest)."""
    base_dir: str = "runs/base"
    """Directory of the current base model (a Hugging Face checkpoint)."""
    assignment: str = "runs/assignment.json"
    """Assignment JSON from `moesaic experts select` (which experts are trained)."""
    domain: str = "corpus:math"
    """Data spec of the task's domain (miners train on its train split, evaluators test)."""
    general: list[str] = field(default_factory=lambda: ["corpus:prose", "corpus:code"])
    """Data specs of the general guard: a delta must not raise their loss."""
    follow_checkpoints: bool = True
    """Each round builds on the latest merged checkpoint on chain (pulled and verified), not
    on base_dir; base_dir is the root the assignment was selected on (protocol/round/lineage.py)."""

    def __post_init__(self):
        if self.task_id < 0:
            raise ValueError(f"[task] task_id must be >= 0, got {self.task_id}")
        for name in ("base_dir", "assignment", "domain"):
            if not getattr(self, name):
                raise ValueError(f"[task] {name} must not be empty")
        if not self.general or not all(self.general):
            raise ValueError("[task] general must list at least one non-empty data spec")


@dataclass(frozen=True)
class MinerConfig:
    """A miner process: where it keeps its rounds and how it trains."""

    work_dir: str = "runs/miner"
    """Round state, deltas and manifests; reuse it after a crash to resume."""
    data: str = ""
    """Training data spec; empty: the task's domain."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """Training settings ([miner.train])."""
    strategy: str = "honest"
    """honest (train); lazy or copycat are the devnet's cheaters (miner/strategies.py)."""

    def __post_init__(self):
        if not self.work_dir:
            raise ValueError("[miner] work_dir must not be empty")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"[miner] strategy {self.strategy!r} unknown; one of {STRATEGIES}")


@dataclass(frozen=True)
class ValidatorConfig:
    """A validator process: its state directory and evaluation settings (flat in [validator])."""

    state_dir: str = "runs/validator"
    """Per-round records; reuse it after a crash to resume."""
    settings: ValidatorSettings = field(default_factory=ValidatorSettings)
    """The ValidatorSettings fields, written directly in [validator]."""

    def __post_init__(self):
        if not self.state_dir:
            raise ValueError("[validator] state_dir must not be empty")


@dataclass(frozen=True)
class ComposeTask:
    """Another task whose accepted experts the merger composes into the same checkpoint."""

    task_id: int
    """The registry's id of that task."""
    assignment: str
    """Its assignment JSON (disjoint from [task]'s: `moesaic experts select --exclude`)."""
    domain: str
    """Its domain's data spec (that task's guard)."""


@dataclass(frozen=True)
class MergerConfig:
    """A merger process: its state directory and merge settings (flat in [merger])."""

    state_dir: str = "runs/merger"
    """Per-round records and merged checkpoints; reuse it after a crash to resume."""
    settings: MergerSettings = field(default_factory=MergerSettings)
    """The MergerSettings fields, written directly in [merger]."""
    compose: list[ComposeTask] = field(default_factory=list)
    """More tasks merged into each checkpoint beside [task]'s, e.g.
    compose = [{task_id = 1, assignment = "runs/code.json", domain = "corpus:code"}]"""

    def __post_init__(self):
        if not self.state_dir:
            raise ValueError("[merger] state_dir must not be empty")


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint of a role process (protocol/ops/metrics.py)."""

    port: int = 0
    """Serve /metrics on 127.0.0.1:port; 0: no endpoint."""

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"[metrics] port must be 0 (off) or 1..65535, got {self.port}")


@dataclass(frozen=True)
class RunConfig:
    """How long and how eagerly the run loop runs."""

    rounds: int | None = None
    """Rounds to run before exiting; omitted (or `--set run.rounds=null`): forever."""
    poll_s: float = 2.0
    """Seconds between chain polls while waiting for a phase."""

    def __post_init__(self):
        if self.rounds is not None and self.rounds <= 0:
            raise ValueError(f"[run] rounds must be positive or omitted, got {self.rounds}")
        if not math.isfinite(self.poll_s) or self.poll_s <= 0:
            raise ValueError(f"[run] poll_s must be a positive number, got {self.poll_s}")


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


# ----------------------------------------------------------------------------- building

# Sections whose TOML keys are the fields of a nested settings dataclass, flat.
_FLAT = {ValidatorConfig: "settings", MergerConfig: "settings"}


def from_dict(data: dict) -> Config:
    """A validated Config from parsed TOML; unknown keys and wrong types name key and section."""
    return _build(Config, data, "")


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML file, apply `section.key=value` overrides, validate."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    return from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """A copy of `data` with each "a.b.c=value" set; value is a TOML literal (3e-3, "x", [..],
    true), a bare word is taken as a string, and `null` removes the key (back to its default)."""
    out = _deep_copy(data)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        keys = dotted.strip().split(".")
        if not sep or not all(keys):
            raise ValueError(f"override {item!r}: expected section.key=value")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {key!r} is not a section")
        raw = raw.strip()
        if raw == "null":
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = _literal(raw)
    return out


def _literal(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word (a path, a device name) is meant as a string


def _deep_copy(data: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def _build(cls: type, data: Any, where: str) -> Any:
    section = f"[{where}]" if where else "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{section} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    flat = _FLAT.get(cls)
    known = {f.name for f in fields(cls) if f.name != flat}
    nested: dict = {}
    if flat:
        known_flat = {f.name for f in fields(hints[flat])}
        nested = {k: v for k, v in data.items() if k in known_flat}
        data = {k: v for k, v in data.items() if k not in known_flat}
        known |= known_flat
    for key in data:
        if key not in known:
            raise ValueError(f"unknown key {key!r} in {section}; known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _value(hints[name], value, f"{where}.{name}" if where else name)
    if flat:
        kwargs[flat] = _build(hints[flat], nested, where)
    try:
        return cls(**kwargs)
    except ValueError as e:
        message = str(e)
        if where and not message.startswith("["):  # say which section the bad value sits in
            message = f"{section}: {message}"
        raise ValueError(message) from None
    except TypeError as e:  # only reachable through a required field without a default
        raise ValueError(f"{section}: {e}") from None


def _value(hint: Any, value: Any, dotted: str) -> Any:
    """Check (and for int -> float, convert) one TOML value against its field's type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]  # None is spelt by omission
    if is_dataclass(hint):
        return _build(hint, value, dotted)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{dotted} must be a list, got {value!r}")
        return [_value(typing.get_args(hint)[0], v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{dotted} must be {hint.__name__}, got {value!r}")
    return value


def _url(value: str, what: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "file"):
        raise ValueError(f"{what} must be a {'/'.join(schemes)} url, got {value!r}")


# ----------------------------------------------------------------------------- run time


def check_runnable(config: Config, role: str) -> None:
    """Run-time checks a role needs before touching the network: its section, a real registry,
    a key file, and the base and assignment on disk."""
    config.role(role)
    if config.chain.registry == ZERO_ADDRESS:
        raise ValueError("[chain] registry is the placeholder zero address: set the real one")
    if config.chain.wallet_name:
        raise ValueError(
            "[chain] wallet_name: a Bittensor hotkey is an sr25519 key and cannot sign EVM "
            "transactions; for kind = 'evm' set key_file or keystore instead"
        )
    if not (config.chain.key_file or config.chain.keystore):
        raise ValueError("[chain] key_file or keystore is required to send transactions")
    missing = [p for p in _required_paths(config) if not Path(p).exists()]
    if missing:
        raise ValueError(f"missing on disk: {', '.join(missing)}")


def _required_paths(config: Config) -> list[str]:
    keys = [k for k in (config.chain.key_file, config.chain.keystore) if k]
    paths = [*keys, config.task.base_dir, config.task.assignment]
    paths += [t.assignment for t in (config.merger.compose if config.merger else [])]
    return paths + ([config.store.key_file] if config.store.key_file else [])


def read_key(path: str) -> str:
    """A key file's contents, stripped. The caller hands them straight to a signer; errors never
    quote them."""
    text = Path(path).read_text().strip()
    if not text:
        raise ValueError(f"key file {path} is empty")
    return text


def chain_label(config: Config, chain_id: int) -> str:
    """The label manifests are signed for: `evm:<chain id>:<registry>`; checks [chain] chain_id."""
    from protocol.round.manifest import evm_chain

    expected = config.chain.chain_id
    if expected is not None and expected != chain_id:
        raise ValueError(f"[chain] chain_id is {expected} but the node at rpc reports {chain_id}")
    return evm_chain(chain_id, config.chain.registry)


# ----------------------------------------------------------------------------- describe


def describe(config: Config, role: str | None = None) -> str:
    """The resolved config as TOML-like text (for --dry-run): shared sections plus `role`'s (all
    roles when None). Key files appear as paths only; store uri credentials are redacted."""
    shown = ["chain", "store", "task", "run", "metrics"] + ([role] if role else list(ROLES))
    lines: list[str] = []
    for name in shown:
        section = getattr(config, name)
        if section is not None:
            _describe(section, name, lines)
    return "\n".join(lines).strip() + "\n"


def _describe(obj: Any, where: str, lines: list[str]) -> None:
    flat = _FLAT.get(type(obj))
    lines += ["", f"[{where}]"]
    later = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == flat:
            lines += [f"{g.name} = {_toml(getattr(value, g.name))}" for g in fields(value)]
        elif is_dataclass(value):
            later.append((value, f"{where}.{f.name}"))
        elif value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            shown = _redact(value) if (where, f.name) == ("store", "uri") else value
            lines.append(f"{f.name} = {_toml(shown)}")
    for value, name in later:
        _describe(value, name, lines)


def _toml(value: Any) -> str:
    if is_dataclass(value):  # an inline table, e.g. one of [merger] compose
        return (
            "{"
            + ", ".join(f"{f.name} = {_toml(getattr(value, f.name))}" for f in fields(value))
            + "}"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _redact(uri: str) -> str:
    """A uri without user:password and without secret-looking query values."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    secret = re.compile(r"key|secret|token|password", re.IGNORECASE)
    query = [(k, "***" if secret.search(k) else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*:/")))


__all__ = [
    "ChainConfig",
    "Config",
    "MergerConfig",
    "MetricsConfig",
    "MinerConfig",
    "RunConfig",
    "StoreConfig",
    "TaskConfig",
    "ValidatorConfig",
    "apply_overrides",
    "chain_label",
    "check_runnable",
    "describe",
    "from_dict",
    "load_config",
    "read_key",
]
