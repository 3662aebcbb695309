"""Typed configuration machinery every role and the CLI share, and the shared TOML sections.

    data = apply_overrides(load_toml("configs/devnet.toml"), ["miner.train.lr=3e-3"])
    chain = build(ChainConfig, data["chain"], "chain")   # a ValueError names a bad key
    add_flags(parser, LocalJob); job = from_flags(LocalJob, parser.parse_args())

Every section or settings group is a frozen dataclass validated at construction, with a
docstring under every field (read back by `field_docs`: it is the CLI help of `add_flags` and
what an operator reads). Unknown keys are errors that name the key and its section (a typo must
not silently fall back to a default). A field made with `flat_field` keeps its keys directly
in its parent's table (`[validator]`'s `domain_batches` lives in its EvalSettings).

The shared sections ([chain], [store], [task], [metrics], [run]) live here; each role's own
section lives with its role (miner/settings.py, validator/settings.py, merger/settings.py) and
moesaic/config.py composes the whole file. Whether paths exist is a run-time question
(`check_paths`), not a load-time one, so a config can be checked on a machine that has not
built the base yet. Key files are read only by `read_key`, at run time; no function here
returns or prints their contents. Torch-free.
"""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import math
import re
import textwrap
import tomllib
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.identity.keyfile import read_private
from protocol.ops.logs import redact_url

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
ZERO_ADDRESS = "0x" + "0" * 40  # the templates' placeholder registry; refused at run time
SHARED = ("chain", "store", "task", "run", "metrics")  # sections every role's file holds


# ----------------------------------------------------------------------------- sections


# The [chain] kinds a role can run on; "subtensor-evm" is named so that it is refused with a
# message saying it is not there yet (protocol.chain.open_chain builds the others).
CHAIN_KINDS = ("evm", "subtensor")
LATER_KINDS = ("subtensor-evm",)
_SS58 = re.compile(r"[1-9A-HJ-NP-Za-km-z]{46,48}")  # base58, the length of a 32-byte account


@dataclass(frozen=True)
class RoundSchedule:
    """[chain.schedule]: the round schedule every role of a subtensor subnet agrees on, in
    blocks (subtensor keeps none; the EVM registry contract holds its own). With commit-reveal
    on, each round's evaluate phase must end in the epoch before the one its weights phase
    falls in: weights committed in epoch E are revealed in epoch E + RevealPeriodEpochs."""

    start_block: int = 0
    """The first block of round 0."""
    train: int = 20
    """Blocks of the train phase."""
    commit: int = 5
    """Blocks of the commit phase."""
    reveal: int = 5
    """Blocks of the reveal phase."""
    evaluate: int = 10
    """Blocks of the evaluate phase (validators commit their weights' hash here)."""
    weights: int = 5
    """Blocks of the weights phase (validators reveal their weights here)."""
    merge: int = 5
    """Blocks of the merge phase."""

    def __post_init__(self):
        if self.start_block < 0:
            raise ValueError(f"[chain.schedule] start_block must be >= 0, got {self.start_block}")
        for f in fields(self)[1:]:
            if getattr(self, f.name) <= 0:
                raise ValueError(f"[chain.schedule] {f.name} must last at least one block")


@dataclass(frozen=True)
class ChainConfig:
    """Which chain (and, on an EVM chain, which registry contract) the role talks to, and the
    key it sends with."""

    kind: str = "evm"
    """Chain backend: "evm" (a MoesaicRegistry contract over JSON-RPC) or "subtensor" (a
    Bittensor subnet through the subtensor node's websocket)."""
    rpc: str = "http://127.0.0.1:8545"
    """The node's endpoint: the EVM node's JSON-RPC url, or the subtensor node's ws(s):// url."""
    registry: str = ZERO_ADDRESS
    """kind "evm": 0x address of the MoesaicRegistry contract (the zero address is a placeholder)."""
    netuid: int | None = None
    """kind "subtensor": the subnet's netuid."""
    publisher: str = ""
    """kind "subtensor": ss58 hotkey whose commitment carries the task and the checkpoints;
    empty: the subnet owner's hotkey."""
    schedule: RoundSchedule | None = None
    """kind "subtensor": [chain.schedule], the round schedule (required there)."""
    key_file: str = ""
    """File holding the sending key: 0x + 64 hex (kind "evm") or sr25519:<secret> (kind
    "subtensor"); read at run time, never printed."""
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
        if self.kind in LATER_KINDS:
            raise ValueError(
                f"[chain] kind {self.kind!r} is not supported yet (a later change adds it); "
                f"use one of {CHAIN_KINDS}"
            )
        if self.kind not in CHAIN_KINDS:
            raise ValueError(f"[chain] kind must be one of {CHAIN_KINDS}, got {self.kind!r}")
        sources = [k for k in ("key_file", "keystore", "wallet_name") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError(
                f"[chain] set exactly one key source, got {' and '.join(sources)} "
                "(key_file, keystore or wallet_name)"
            )
        if self.kind == "subtensor":
            self._check_subtensor()
            return
        _url(self.rpc, "[chain] rpc", ("http", "https", "ws", "wss"))
        if not _ADDRESS.fullmatch(self.registry):
            raise ValueError(f"[chain] registry must be a 0x address, got {self.registry!r}")
        if self.chain_id is not None and self.chain_id <= 0:
            raise ValueError(f"[chain] chain_id must be positive, got {self.chain_id}")
        given = [k for k in ("netuid", "schedule") if getattr(self, k) is not None]
        given += ["publisher"] if self.publisher else []
        if given:
            raise ValueError(
                f"[chain] {', '.join(given)}: only for kind 'subtensor' (the registry contract "
                "holds the schedule and records of kind 'evm')"
            )

    def _check_subtensor(self) -> None:
        _url(self.rpc, "[chain] rpc (the subtensor node's websocket)", ("ws", "wss"))
        if self.netuid is None:
            raise ValueError("[chain] netuid is required for kind 'subtensor'")
        if not 1 <= self.netuid <= 65535:  # u16; netuid 0 is the root network, not a subnet
            raise ValueError(f"[chain] netuid must be a subnet's, 1..65535, got {self.netuid}")
        if self.schedule is None:
            raise ValueError(
                "[chain] kind 'subtensor' needs [chain.schedule]: subtensor keeps no round "
                "schedule, and every role of the subnet must use the same one"
            )
        if self.keystore:
            raise ValueError(
                "[chain] keystore holds an Ethereum key; kind 'subtensor' signs with an sr25519 "
                "hotkey: set wallet_name (a Bittensor wallet) or key_file (sr25519:<secret>)"
            )
        if self.registry != ZERO_ADDRESS or self.chain_id is not None:
            raise ValueError("[chain] registry and chain_id are for kind 'evm', not 'subtensor'")
        if self.publisher and not _SS58.fullmatch(self.publisher):
            raise ValueError(f"[chain] publisher must be an ss58 hotkey, got {self.publisher!r}")


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


# ----------------------------------------------------------------------------- building


def flat_field(cls: type) -> Any:
    """A nested settings group whose keys sit directly in its parent's table, not in a table of
    their own (operators write `domain_batches = 24` in [validator], not [validator.evaluation])."""
    return field(default_factory=cls, metadata={"flat": True})


def _is_flat(f: Field) -> bool:
    return bool(f.metadata.get("flat"))


def table_keys(cls: type) -> set[str]:
    """The keys a table for dataclass `cls` may hold: its fields, a flat group's keys in its
    place."""
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    for f in fields(cls):
        keys |= table_keys(hints[f.name]) if _is_flat(f) else {f.name}
    return keys


def load_toml(path: str | Path) -> dict:
    """A TOML file as a dict; a syntax error names the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


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


def build(cls: type, data: Any, where: str = "") -> Any:
    """A validated `cls` from a parsed TOML table (`where`: its dotted name, "" for the top
    level); unknown keys and wrong types name key and section."""
    section = f"[{where}]" if where else "the top level"
    if not isinstance(data, dict):
        raise ValueError(f"{section} must be a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    flats = {f.name: table_keys(hints[f.name]) for f in fields(cls) if _is_flat(f)}
    known = table_keys(cls)
    for key in data:
        if key not in known:
            raise ValueError(f"unknown key {key!r} in {section}; known: {sorted(known)}")
    flat_keys = set().union(*flats.values())
    kwargs = {}
    for name, value in data.items():
        if name not in flat_keys:
            kwargs[name] = _value(hints[name], value, f"{where}.{name}" if where else name)
    for name, keys in flats.items():
        kwargs[name] = build(hints[name], {k: v for k, v in data.items() if k in keys}, where)
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
    hint = _unoptional(hint)  # None is spelt by omission
    if is_dataclass(hint):
        return build(hint, value, dotted)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ValueError(f"{dotted} must be a list, got {value!r}")
        return [_value(typing.get_args(hint)[0], v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{dotted} must be {hint.__name__}, got {value!r}")
    return value


def _unoptional(hint: Any) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
    return hint


def _url(value: str, what: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "file"):
        raise ValueError(f"{what} must be a {'/'.join(schemes)} url, got {redact_url(value)!r}")


# ----------------------------------------------------------------------------- CLI flags


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in `cls`'s source, whitespace collapsed
    (Python keeps no attribute docstrings at run time); {} when the source is unavailable."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def add_flags(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()):
    """One `--flag-name` per field of dataclass `cls` (a nested dataclass field: its fields'
    flags, flat), with the field's type and default and its docstring as help. A field without
    a default is a required flag; a bool is a switch (`--x`, or `--no-x` when it defaults to
    true). When every field of `cls` has a default, each value is checked by `cls`'s own
    validation as it is parsed, so a bad one is a usage error naming its key. `from_flags`
    builds `cls` back from the parsed arguments."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    checkable = all(_default(f) is not MISSING for f in fields(cls))
    for f in fields(cls):
        if f.name in exclude:
            continue
        hint = _unoptional(hints[f.name])
        if is_dataclass(hint):
            add_flags(parser, hint, exclude=exclude)
            continue
        flag = "--" + f.name.replace("_", "-")
        default = _default(f)
        # argparse formats help with %: a literal percent sign must be doubled.
        help_text = docs.get(f.name, "").replace("%", "%%")
        if default is MISSING:
            options: dict[str, Any] = dict(required=True)
        else:
            options = dict(default=default)
            help_text += " (default: %(default)s)"
        if hint is bool:
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            options = dict(action=action, default=bool(default))
        elif hint in (int, float, str):
            options["type"] = _checked(cls, f.name, hint) if checkable else hint
            options["metavar"] = f.name.upper()
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no flag for type {hints[f.name]!r}")
        parser.add_argument(flag, dest=f.name, help=help_text.strip(), **options)


def _checked(cls: type, name: str, convert: type):
    """An argparse `type=` converting like `convert`, then validating the value as field `name`
    of `cls` (the other fields at their defaults)."""

    def parse(text: str):
        value = convert(text)  # a ValueError here is argparse's "invalid int value"
        try:
            cls(**{name: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = convert.__name__
    return parse


def from_flags(cls: type, args: argparse.Namespace, **given: Any) -> Any:
    """`cls` built from the arguments `add_flags(parser, cls)` parsed; `given` sets the fields
    the flags were not made for (`exclude`). Validation errors are the dataclass's own."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif is_dataclass(_unoptional(hints[f.name])):
            kwargs[f.name] = from_flags(_unoptional(hints[f.name]), args, **given)
        elif hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


# ----------------------------------------------------------------------------- run time


def check_paths(paths: list[str]) -> None:
    """A ValueError listing every path in `paths` missing on this machine."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"missing on disk: {', '.join(missing)}")


def read_key(path: str) -> str:
    """A key file's contents, stripped. The caller hands them straight to a signer; errors never
    quote them."""
    text = read_private(path).strip()  # refused when other users may read or write it
    if not text:
        raise ValueError(f"key file {path} is empty")
    return text


# ----------------------------------------------------------------------------- describe


def describe_tables(obj: Any, names: list[str]) -> str:
    """The named sections of `obj` (a dataclass of sections) as TOML text that loads back to
    the same values; unset sections are skipped. URLs' credentials are redacted
    (protocol.ops.logs.redact_url), key files appear as paths only."""
    lines: list[str] = []
    for name in names:
        section = getattr(obj, name)
        if section is not None:
            _describe(section, name, lines)
    return "\n".join(lines).strip() + "\n"


def _describe(obj: Any, where: str, lines: list[str]) -> None:
    lines += ["", f"[{where}]"]
    later: list[tuple[Any, str]] = []
    _describe_keys(obj, where, lines, later)
    for value, name in later:
        _describe(value, name, lines)


def _describe_keys(obj: Any, where: str, lines: list[str], later: list) -> None:
    for f in fields(obj):
        value = getattr(obj, f.name)
        if _is_flat(f):
            _describe_keys(value, where, lines, later)
        elif is_dataclass(value):
            later.append((value, f"{where}.{f.name}"))
        elif value is None:
            lines.append(f"# {f.name} = (unset)")
        else:
            # Any URL (the chain's rpc, the store's uri, a compose entry's) loses its secrets.
            shown = redact_url(value) if isinstance(value, str) and "://" in value else value
            lines.append(f"{f.name} = {_toml(shown)}")


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


__all__ = [
    "CHAIN_KINDS",
    "SHARED",
    "ZERO_ADDRESS",
    "ChainConfig",
    "MetricsConfig",
    "RoundSchedule",
    "RunConfig",
    "StoreConfig",
    "TaskConfig",
    "add_flags",
    "apply_overrides",
    "build",
    "check_paths",
    "describe_tables",
    "field_docs",
    "flat_field",
    "from_flags",
    "load_toml",
    "read_key",
    "table_keys",
]
