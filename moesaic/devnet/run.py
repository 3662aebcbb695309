"""`moesaic devnet`: set up a local network, run every role as its own process, summarise.

    run_devnet(DevnetOptions(rounds=2, out="runs/devnet"))   # -> exit code

The steps read like the setup an operator would do by hand:

1. build the demo base and select the task's experts (reused when `out` already has them);
2. start anvil, deploy the registry with a schedule that starts a few blocks ahead, register
   every key, authorise the validators, set the merger, publish the task;
3. start the blob server, writable by the miners' and the merger's keys;
4. write one TOML config per process (the embedded configs/devnet.toml plus per-process
   overrides, resolved and saved under out/configs/ so each run can be inspected and re-run);
5. switch anvil to mining by the devnet clock (clock.py) and start the processes: 3 honest
   miners, 1 lazy, 1 front-runner, 2 validators, 1 merger, each `moesaic <role> run --config ...`;
6. show a live view until every process has finished its rounds (or one failed);
7. train the solo baseline: one honest miner alone for as many rounds (solo.py);
8. pull the final checkpoint with `moesaic checkpoint pull`, measure the original base, every
   round's checkpoint and the solo line on one fixed held-out set, print the summary
   (summary.py; also out/summary/summary.json), and return non-zero if the network did not do
   its job.

Every process is stopped by its pid (its own process group) on the way out, whatever happens:
SIGTERM (what `timeout`, a service manager or a CI runner sends) as Ctrl-C (procs.StopOnSignals);
logs/pids.json lists every process started, with its pid.

This file is long (past 500 lines) on purpose: it is the devnet's setup sequence, read top to
bottom like the steps above; the parts that stand on their own live beside it (procs, clock,
solo, summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from eth_account import Account
from web3 import Web3

from dashboard.browser import dump_dom, screenshot
from miner.settings import COPYING
from moesaic.cli import main
from moesaic.config import describe, load_config
from moesaic.devnet import procs
from moesaic.devnet.clock import Clock, Gate
from moesaic.devnet.solo import run_solo
from moesaic.devnet.summary import check, format_summary, live_line, summarise
from protocol.chain.evm import EvmChain, deploy_registry
from protocol.identity.hashing import sha256_dir
from protocol.identity.keyfile import write_private
from protocol.moe.data import write_docs
from protocol.moe.experts import Assignment
from protocol.ops.atomic import write_text_atomic
from protocol.round.schedule import Schedule, phase_bounds

log = logging.getLogger("moesaic.devnet")

# A dozen torch processes share the machine's cores: each with torch's default thread pool
# (one thread per core) they oversubscribe, and two evaluating at once on 2 cores took 6.2 s
# per batch instead of 0.05 s (measured, tiny base). One thread each, unless the user says;
# the merger keeps torch's default: it computes alone, in the merge phase, while the others
# wait for its checkpoint (one thread there left a core idle for ~7 s a round).
ROLE_ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
ALONE_ROLES = ("merger",)

# The cast: (name, role, strategy). Names are also the key file and work/state dir names.
HONEST = (
    ("honest0", "miner", "honest"),
    ("honest1", "miner", "honest"),
    ("honest2", "miner", "honest"),
)
JUDGES = (
    ("validator0", "validator", None),
    ("validator1", "validator", None),
    ("merger", "merger", None),
)
# The default cheaters (issue 15's attacks); --cheaters adds general_harm, nan_some and copycat
# (a sybil's exact or scaled copy).
CHEATERS = ("lazy", "copier", "frontrunner", "deleter", "evalpool")
# Cheaters that must earn nothing from round 0 on. (replay and replay_relabel train honestly
# while they have nothing to replay, so a round-0 weight would be earned: tests cover them.)
# evalpool (training on the old public evaluation pool) is real work on public text: it must
# earn no more than an honest miner (summary.check), as the validators score on private text.
DEVNET_CHEATERS = (
    "lazy", "copycat", "copier", "general_harm", "nan_some", "frontrunner", "deleter", "evalpool",
)  # fmt: skip
# Commit only after others did (a sybil after its partner, the front-runner after anyone):
# the copy_lead gate does not wait for them.
WATCHERS = (*COPYING, "frontrunner")


# With --dishonest-validators (validator.strategies), beside the two honest ones: one that gives
# all its weight to the lazy miner, and one that evaluates nothing it sets and reveals another
# validator's latest visible weights (the previous round's: this round's are committed unseen).
COLLUDER = ("colluder", "validator", "colluding")
WEIGHT_COPIER = ("weightcopier", "validator", "copier")


def cast_of(
    cheaters: tuple[str, ...], dishonest: bool = False
) -> tuple[tuple[str, str, str | None], ...]:
    """The devnet's processes: 3 honest miners, the cheaters, 2 validators (4 with the
    colluding and the weight-copying one) and a merger."""
    unknown = sorted(set(cheaters) - set(DEVNET_CHEATERS))
    if unknown:
        raise ValueError(f"--cheaters: {unknown} unknown; choose from {list(DEVNET_CHEATERS)}")
    if dishonest and "lazy" not in cheaters:
        raise ValueError(
            "--dishonest-validators: the colluder colludes with the lazy miner; add lazy to "
            "--cheaters"
        )
    judges = (*JUDGES[:-1], COLLUDER, WEIGHT_COPIER, JUDGES[-1]) if dishonest else JUDGES
    return (*HONEST, *((c, "miner", c) for c in dict.fromkeys(cheaters)), *judges)


# Each demo base's settings are tuned for it: its role config (learning rate, steps,
# thresholds) and the ESFT threshold its experts are selected with. On the tiny base p=0.2
# (18 of 256 experts) drifts general text ~0.18 nats per nat of math gained over 8 rounds,
# p=0.3 (29 experts) ~0.29 (docs/network.md).
PRESET_CONFIGS = {
    "tiny": procs.ROOT / "configs" / "devnet.toml",
    "test": procs.ROOT / "configs" / "devnet-test.toml",
}
PRESET_SELECT_P = {"tiny": 0.2, "test": 0.3}
LEAD = 4  # spare blocks between the end of setup (one block per tx, automined) and round 0


@dataclass(frozen=True)
class DevnetOptions:
    """What `moesaic devnet` runs; every field is a CLI flag."""

    rounds: int = 8
    out: str = "runs/devnet"
    preset: str = "tiny"
    config: str = ""  # empty: the preset's embedded config (PRESET_CONFIGS)
    block_s: float = 0.25
    patience_s: float = 900.0
    phases: dict = field(
        default_factory=lambda: dict(train=8, commit=24, reveal=1, evaluate=2, weights=12, merge=12)
    )
    copy_lead: int = 12
    cheaters: tuple[str, ...] = CHEATERS
    dishonest_validators: bool | None = None  # None: when the lazy miner is in the cast
    select_p: float = 0.0  # 0: the preset's (PRESET_SELECT_P)
    json_summary: str | None = None
    live: bool = True
    timeout_s: float = 3600.0
    overrides: tuple[str, ...] = ()  # extra --set KEY=VALUE for every process
    dashboard: bool = True  # serve `moesaic dashboard` on 127.0.0.1 while the devnet runs
    snapshot: str | None = None  # save the final dashboard page (HTML + PNG) in this directory
    solo: bool = True  # train the solo baseline after the rounds (solo.py)

    def __post_init__(self):
        if self.rounds <= 0:
            raise ValueError(f"--rounds must be positive, got {self.rounds}")
        if self.preset not in PRESET_CONFIGS:
            raise ValueError(
                f"--preset must be one of {sorted(PRESET_CONFIGS)}, got {self.preset!r}"
            )
        if not self.config:
            object.__setattr__(self, "config", str(PRESET_CONFIGS[self.preset]))
        if not self.select_p:
            object.__setattr__(self, "select_p", PRESET_SELECT_P[self.preset])
        if not 0 < self.block_s <= 10:
            raise ValueError(f"--block-s must be in (0, 10], got {self.block_s}")
        if self.copy_lead >= self.phases["commit"]:
            raise ValueError("copy_lead must be shorter than the commit phase")
        if self.dishonest_validators is None:
            object.__setattr__(self, "dishonest_validators", "lazy" in self.cheaters)
        cast_of(self.cheaters, self.dishonest_validators)  # names them if unknown


@dataclass
class Member:
    """One process of the cast: its key, config, log and (once started) its process."""

    name: str
    role: str
    strategy: str | None
    key_file: Path
    address: str
    config: Path | None = None
    log: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def own_dir(self) -> Path:
        return self.config.parent.parent / self.name


def run_devnet(opts: DevnetOptions) -> int:
    """Run the devnet; the summary's exit code (0: the network did its job), or 128 + the
    signal's number when SIGTERM or SIGINT stopped it: every process it started (anvil, the
    blob server, the dashboard, each role) is stopped by its pid first, whatever the signal."""
    out = Path(opts.out).resolve()
    started: list[subprocess.Popen] = []  # every process, in start order (logs/pids.json)
    # Signal handlers can only be set from the main thread (a test may run this in another).
    main_thread = threading.current_thread() is threading.main_thread()
    try:
        with procs.StopOnSignals() if main_thread else contextlib.nullcontext():
            return _run(opts, out, started)
    except procs.Stopped as e:
        left = [p.pid for p in started if p.poll() is None]
        print(
            f"devnet: stopped by {e.name}: "
            + (f"pids {left} still running" if left else f"all {len(started)} processes it "
               f"started are stopped (pids in {out / 'logs' / 'pids.json'})"),
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return 128 + e.signum


def _run(opts: DevnetOptions, out: Path, started: list[subprocess.Popen]) -> int:
    fresh_run_dirs(out)
    begun = time.monotonic()
    base, assignment = prepare_task(out, opts)
    cast = make_cast(out, cast_of(opts.cheaters, opts.dishonest_validators))
    try:
        net = start_chain(out, opts, cast, base, assignment, started)
        store_url = start_store(out, cast, started)
        write_configs(out, opts, cast, net, store_url, base, assignment)
        dashboard = start_dashboard(out, net, store_url, started) if opts.dashboard else None
        clock = start_clock(net, opts, cast)
        try:
            start_processes(cast, started, out)
            watch(cast, clock, net, opts)
        finally:
            clock.stopped.set()
            clock.join(timeout=10)
            procs.stop_all([m.proc for m in cast if m.proc is not None])
        solo = train_solo(out, opts, cast, base, assignment) if opts.solo else None
        summary = summarise(
            out, opts, cast, net, base, time.monotonic() - begun, clock.waited, solo
        )
        # Before the dashboard snapshot: the page and `moesaic report --run` read the curve here.
        write_text_atomic(out / "summary" / "summary.json", json.dumps(summary, indent=2) + "\n")
        if dashboard and opts.snapshot:
            summary["dashboard"] = snapshot_dashboard(dashboard, Path(opts.snapshot))
    finally:
        procs.stop_all(started)
    failures = check(summary)
    summary["failures"] = failures
    print(format_summary(summary))
    text = json.dumps(summary, indent=2) + "\n"
    write_text_atomic(out / "summary" / "summary.json", text)
    if opts.json_summary:
        write_text_atomic(Path(opts.json_summary), text)
    for f in failures:
        print(f"devnet: FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


def train_solo(out: Path, opts: DevnetOptions, cast: list[Member], base, assignment) -> list:
    """The solo baseline (solo.py) with the first honest miner's config: settings, round seeds."""
    first = next(m for m in cast if m.strategy == "honest")
    _say(f"training the solo line ({opts.rounds} rounds with {first.name}'s settings, alone)")
    begun = time.monotonic()
    rows = run_solo(out / "solo", load_config(first.config), base, assignment, opts.rounds)
    _say(f"solo line trained in {time.monotonic() - begun:.0f} s")
    return rows


def record_pids(out: Path, started: list[subprocess.Popen], cast: list[Member]) -> None:
    """logs/pids.json: the devnet's pid and every process it started (procs.record_pids)."""
    names = {id(m.proc): m.name for m in cast if m.proc is not None}
    procs.record_pids(out / "logs" / "pids.json", started, names)


# ----------------------------------------------------------------------------- setup steps


def prepare_task(out: Path, opts: DevnetOptions) -> tuple[Path, Path]:
    """The demo base and the task's expert assignment (built once, reused by later runs)."""
    base, assignment = out / f"base-{opts.preset}", out / f"math-{opts.preset}.json"
    if not (base / "config.json").is_file():
        _say(f"building the {opts.preset} base in {base}")
        if main(["base", "build", "--preset", opts.preset, "--out", str(base), "--quiet"]) != 0:
            raise RuntimeError("building the base failed")
    if not assignment.is_file():
        _say("selecting the math task's experts (ESFT token ratio)")
        args = ["experts", "select", "--model", str(base), "--data", "corpus:math"]
        args += ["--method", "token-ratio", "--p", str(opts.select_p), "--tokens", "8192"]
        args += ["--seq-len", "64", "--out", str(assignment), "--quiet"]
        if main(args) != 0:
            raise RuntimeError("expert selection failed")
    return base, assignment


def fresh_run_dirs(out: Path) -> None:
    """A new chain means new rounds: clear the previous run's role state, blobs and logs (the
    base and the assignment are kept: they do not depend on the chain)."""
    roles = [n for n, _, _ in cast_of(DEVNET_CHEATERS, dishonest=True)]
    for name in roles + ["blobs", "configs", "logs", "final", "summary", "solo"]:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "logs").mkdir(parents=True)


def make_cast(out: Path, cast: tuple) -> list[Member]:
    """Deterministic keys for the cast (a devnet's keys are not secrets), written to key files."""
    keys = out / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    members = []
    for name, role, strategy in (("owner", "owner", None), *cast):
        key = hashlib.sha256(f"moesaic-devnet:{name}".encode()).digest()
        path = keys / f"{name}.key"
        write_private(path, "0x" + key.hex() + "\n")  # 0600 from creation: roles refuse wider
        address = Account.from_key(key).address
        members.append(Member(name, role, strategy, path, address))
    return members


@dataclass
class Net:
    """The running chain: its url, registry address and schedule."""

    url: str
    registry: str
    schedule: Schedule
    w3: object


def start_chain(out, opts, cast, base, assignment, started) -> Net:
    """anvil + the registry, every key registered, validators authorised, the task published."""
    _, url = procs.start_anvil(out / "logs" / "anvil.log", started=started)
    record_pids(out, started, cast)
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 60}))
    accounts = {m.name: Account.from_key(m.key_file.read_text().strip()) for m in cast}
    for a in accounts.values():
        procs.rpc(url, "anvil_setBalance", [a.address, hex(10**24)])
    # deploy, a registration per miner and validator, authorisations, the merger, the task
    setup_txs = 3 + sum(m.role in ("miner", "validator") for m in cast)
    setup_txs += sum(m.role == "validator" for m in cast)
    schedule = Schedule(start_block=w3.eth.block_number + setup_txs + LEAD, **opts.phases)
    owner = accounts["owner"]
    registry = deploy_registry(w3, owner, schedule)
    admin = EvmChain(w3, registry, owner)
    for m in cast:
        if m.role in ("miner", "validator"):
            EvmChain(w3, registry, accounts[m.name]).register()
        if m.role == "validator":
            admin.authorise_validator(m.address)
        if m.role == "merger":
            admin.set_merger(m.address)
    admin.publish_task(
        sha256_dir(base), Assignment.load(assignment).hash(), "00" * 32, "corpus:math"
    )
    if w3.eth.block_number >= schedule.start_block:
        raise RuntimeError("setup took longer than LEAD blocks; raise LEAD")
    _say(f"anvil {url}, registry {registry}, round 0 starts at block {schedule.start_block}")
    return Net(url, registry, schedule, w3)


def start_store(out: Path, cast: list[Member], started: list) -> str:
    """The blob server; the miners and the merger may write, anyone may read."""
    writers = [m.address for m in cast if m.role in ("miner", "merger")]
    log = out / "logs" / "store.log"
    _, url = procs.start_blob_server(out / "blobs", writers, log, started=started)
    record_pids(out, started, cast)
    _say(f"blob server {url}")
    return url


def write_configs(out, opts, cast, net: Net, store_url, base, assignment) -> None:
    """One resolved TOML per process: configs/devnet.toml + this run's overrides."""
    (out / "configs").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    domain = load_config(opts.config, list(opts.overrides)).task.domain
    for i, m in enumerate(c for c in cast if c.role != "owner"):
        own = out / m.name
        sets = [
            f'chain.rpc="{net.url}"',
            f'chain.registry="{net.registry}"',
            f'chain.key_file="{m.key_file}"',
            f'store.uri="{store_url}"',
            f'task.base_dir="{base}"',
            f'task.assignment="{assignment}"',
            f"run.rounds={opts.rounds}",
            f"run.poll_s={min(1.0, opts.block_s)}",
        ]
        if m.role == "miner":
            sets += [f'miner.work_dir="{own}"', f'miner.strategy="{m.strategy}"']
            sets += [f"miner.train.seed={i}"]
            if m.strategy in COPYING:  # a sybil: re-ships the first honest miner's delta
                sets += [f'miner.copy_from="{out / HONEST[0][0]}"']
        else:
            sets += [f'{m.role}.state_dir="{own}"']
        if m.role == "validator":
            sets += [f'validator.heldout="{carve_heldout(own, domain)}"']
        if m.role == "validator" and m.strategy == "colluding":  # the colluder and its miner
            lazy = next(c for c in cast if c.strategy == "lazy")
            sets += [
                f'validator.strategy="{m.strategy}"',
                f'validator.collude_with="{lazy.address}"',
            ]
        if m.role == "validator" and m.strategy == "copier":  # copies validator0's weights
            source = next(c for c in cast if c.name == JUDGES[0][0])
            sets += [
                f'validator.strategy="{m.strategy}"',
                f'validator.copy_from="{source.address}"',
            ]
        config = load_config(opts.config, [*sets, *opts.overrides])
        m.config = out / "configs" / f"{m.name}.toml"
        text = f"# {m.name}: {m.role}" + (f" ({m.strategy})" if m.strategy else "") + "\n"
        m.config.write_text(text + describe(config, m.role))
        load_config(m.config)  # what the process will read must load back the same way
        m.log = out / "logs" / f"{m.name}.log"


def carve_heldout(own: Path, domain: str) -> str:
    """A validator's private held-out text, in its own directory: the domain's val split, which
    no miner's data spec reads (miners train on the train split; evalpool adds the test split).
    On a devnet everything is in the repository anyway, and both validators get the same text;
    on a real subnet each validator keeps text of its own that never leaves its machine."""
    path = own / "heldout" / "domain.jsonl"
    write_docs(domain, "val", path)
    return f"jsonl:{path}"


def start_dashboard(out: Path, net: Net, store_url: str, started: list) -> str:
    """`moesaic dashboard` over this run's chain and state directories; its url."""
    log = out / "logs" / "dashboard.log"
    for attempt in range(2):  # the free port may be taken between choosing and binding it
        port = procs.free_port()
        cmd = [sys.executable, "-m", "moesaic", "dashboard", "--rpc", net.url, "--registry"]
        cmd += [net.registry, "--store", store_url, "--run", str(out), "--port", str(port)]
        cmd += ["--refresh", "5", "--label", "devnet"]
        with log.open("ab") as sink:
            proc = procs.spawn(cmd, started, stdout=sink, stderr=sink, cwd=procs.ROOT)
        record_pids(out, started, [])
        url = f"http://127.0.0.1:{port}"
        try:
            procs.wait_http(url + "/healthz", proc, log)
        except RuntimeError:
            procs.stop(proc)
            if attempt:
                raise
            continue
        _say(f"dashboard {url}/ (refreshes every 5 s)")
        return url
    raise AssertionError("unreachable")


def snapshot_dashboard(url: str, folder: Path) -> dict:
    """The final dashboard page as headless Chromium renders it: HTML and a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    html = folder / "dashboard.html"
    html.write_text(dump_dom(url + "/", profile=folder / ".profile-dom"))
    png = screenshot(url + "/", folder / "dashboard.png", profile=folder / ".profile-shot")
    for profile in (".profile-dom", ".profile-shot"):
        shutil.rmtree(folder / profile, ignore_errors=True)
    _say(f"dashboard snapshot: {png}")
    return {"url": url, "html": str(html), "png": str(png)}


def start_clock(net: Net, opts: DevnetOptions, cast: list[Member]) -> Clock:
    """Turn anvil's automine off and start producing blocks with the gated clock."""
    procs.rpc(net.url, "evm_setAutomine", [False])
    clock = Clock(
        mine=lambda: procs.rpc(net.url, "anvil_mine", ["0x1"], timeout=30),
        head=lambda: int(procs.rpc(net.url, "eth_blockNumber"), 16),
        schedule=net.schedule,
        ready=lambda gate: gate_ready(gate, net, cast),
        block_s=opts.block_s,
        patience_s=opts.patience_s,
        copy_lead=opts.copy_lead,
        rounds=opts.rounds,
    )
    clock.start()
    return clock


def gate_ready(gate: Gate, net: Net, cast: list[Member]) -> bool:
    """Whether the processes' transactions for the gate have landed or are pending."""
    chain = EvmChain(net.w3, net.registry)
    pending = int(procs.rpc(net.url, "txpool_status")["pending"], 16)
    miners = [m for m in cast if m.role == "miner"]
    if gate.kind in ("copy_lead", "commits"):
        need = len(miners) - (gate.kind == "copy_lead") * sum(
            m.strategy in WATCHERS for m in miners
        )
        return len(chain.commitments(gate.round)) + pending >= need
    if gate.kind == "reveals":  # each miner that committed has recorded its reveal
        return all(_revealed(m, gate.round) for m in miners)
    if gate.kind in ("weight_commits", "weights"):  # each validator recorded the step or sent it
        step = "commit_weights" if gate.kind == "weight_commits" else "set_weights"
        validators = [m for m in cast if m.role == "validator"]
        recorded = sum(_recorded(m, gate.round, step) for m in validators)
        return recorded + pending >= len(validators)
    merger = next(m for m in cast if m.role == "merger")
    record = merger.own_dir / "rounds" / f"{gate.round}.json"
    published = chain.checkpoint(gate.round) is not None
    recorded = record.is_file() and "publish" in json.loads(record.read_text())
    return published or recorded or pending > 0


def _recorded(m: Member, r: int, step: str) -> bool:
    """Whether a process has recorded `step` of round r (a validator with nothing to commit
    records that too, so a gate never waits for a transaction that will not come)."""
    try:
        return step in json.loads((m.own_dir / "rounds" / f"{r}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _revealed(m: Member, r: int) -> bool:
    """Whether a miner has nothing left to reveal in round r (revealed, or never committed)."""
    path = m.own_dir / "rounds" / f"{r}.json"
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return True  # nothing recorded: no commitment of this process to wait for
    return not state.get("committed") or bool(state.get("revealed"))


def start_processes(cast: list[Member], started: list, out: Path) -> None:
    for m in cast:
        if m.role == "owner":
            continue
        cmd = [sys.executable, "-m", "moesaic", m.role, "run", "--config", str(m.config)]
        with m.log.open("ab") as sink:
            m.proc = procs.spawn(
                cmd,
                started,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=procs.ROOT,
                env=None if m.role in ALONE_ROLES else ROLE_ENV,
            )
        record_pids(out, started, cast)
        _say(
            f"started {m.name} ({m.role}{', ' + m.strategy if m.strategy else ''}) pid {m.proc.pid}"
        )


def watch(cast: list[Member], clock: Clock, net: Net, opts: DevnetOptions) -> None:
    """The live view, until every process exited; raises if one failed or time ran out."""
    deadline = time.monotonic() + opts.timeout_s
    last = ""
    running = [m for m in cast if m.proc is not None]
    while True:
        codes = {m.name: m.proc.poll() for m in running}
        failed = {n: c for n, c in codes.items() if c not in (None, 0)}
        if failed:
            name = next(iter(failed))
            tail = next(m for m in cast if m.name == name).log.read_text()[-4000:]
            raise RuntimeError(f"{name} exited with {failed[name]}; its log ends:\n{tail}")
        if clock.error is not None:
            raise RuntimeError(f"the block clock failed: {clock.error!r}")
        if all(c == 0 for c in codes.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the devnet did not finish within {opts.timeout_s:.0f} s")
        with contextlib.suppress(Exception):  # the view must never end the run
            line = live_line(cast, net)
            if opts.live and line != last:
                _say(line)
                last = line
        time.sleep(1.0)


def round_wall(schedule: Schedule, r: int) -> tuple[int, int]:
    """(first, last) block of round r."""
    return phase_bounds(schedule, r, "train")[0], phase_bounds(schedule, r, "merge")[1]


def _say(text: str) -> None:
    print(f"[devnet] {text}", flush=True)
