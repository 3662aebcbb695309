"""`moesaic chain`: deploy the MoesaicRegistry contract to an EVM chain and show its state.

    moesaic chain deploy --rpc http://127.0.0.1:8545 --key 0x... --schedule 0,20,5,5,10,5,5
    moesaic chain status --rpc http://127.0.0.1:8545 --registry 0x...
    moesaic chain register --rpc ... --registry 0x... --keystore miner.json --password-file p
    moesaic chain authorise-validator 0xVALIDATOR --rpc ... --registry 0x... --keystore owner.json ...
    moesaic chain set-merger 0xMERGER --rpc ... --registry 0x... --keystore owner.json ...
    moesaic chain publish-task --base runs/base --assignment runs/math.json --data corpus:math ...

Torch- and web3-free at import (web3 loads inside the handlers), so `moesaic --help` stays fast.
"""

from __future__ import annotations

from protocol.identity.keyfile import read_private
from protocol.ops.logs import redact_url

SCHEDULE_FIELDS = ("start", "train", "commit", "reveal", "evaluate", "weights", "merge")


def parse_schedule(text: str):
    """'start,train,commit,reveal,evaluate,weights,merge' block counts -> Schedule."""
    from protocol.round.schedule import Schedule

    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(SCHEDULE_FIELDS):
        raise ValueError(
            f"--schedule needs {len(SCHEDULE_FIELDS)} integers: {','.join(SCHEDULE_FIELDS)}"
        )
    try:
        start, *lengths = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--schedule has a non-integer in {text!r}") from None
    return Schedule(start, *lengths)


def _account(args):
    from protocol.chain.evm import load_account

    if args.keystore is None:
        return load_account(key=args.key)
    if args.password_file is None:
        raise ValueError("--keystore needs --password-file")
    # Only the line break an editor adds is stripped: spaces may be part of the password.
    password = read_private(args.password_file, "password file").rstrip("\r\n")
    return load_account(keystore=args.keystore, password=password)


def connect_rpc(url: str):
    from moesaic.cli import CliError
    from protocol.chain.evm import connect

    w3 = connect(url)
    if not w3.is_connected():
        raise CliError(f"no JSON-RPC endpoint answers at {redact_url(url)}")
    return w3


def _deploy(args) -> int:
    from moesaic.cli import CliError
    from protocol.chain import ChainError
    from protocol.chain.evm import deploy_registry

    account = _account(args)
    w3 = connect_rpc(args.rpc)
    # Default: round 0 starts at the current block, with the protocol's default phase lengths.
    schedule = parse_schedule(args.schedule) if args.schedule else None
    if schedule is None:
        from protocol.round.schedule import Schedule

        schedule = Schedule(start_block=w3.eth.block_number)
    if args.bond < 0:
        raise ValueError("--bond must be >= 0 wei")
    try:
        address = deploy_registry(w3, account, schedule, args.bond)
    except ChainError as e:
        raise CliError(str(e)) from None
    print(f"registry  {address}")
    print(f"chain_id  {w3.eth.chain_id}")
    print(f"owner     {account.address}")
    print(f"min_bond  {args.bond} wei")
    print(f"schedule  {_schedule_text(schedule)} (round = {schedule.round_length} blocks)")
    return 0


def _schedule_text(schedule) -> str:
    values = (schedule.start_block, *schedule.lengths)
    return " ".join(f"{k}={v}" for k, v in zip(SCHEDULE_FIELDS, values, strict=True))


def _status(args) -> int:
    from moesaic.cli import CliError
    from protocol.chain import ChainError
    from protocol.chain.evm import EvmChain

    chain = EvmChain(connect_rpc(args.rpc), args.registry)
    try:
        _print_status(chain)
    except ChainError as e:
        raise CliError(str(e)) from None
    return 0


def _print_status(chain) -> None:
    block = chain.block()
    schedule = chain.schedule()
    print(f"registry  {chain.registry}")
    print(f"block     {block}")
    print(f"schedule  {_schedule_text(schedule)}")
    pos = chain.position(block)
    if pos is None:
        print(f"round     not started (round 0 starts at block {schedule.start_block})")
    else:
        rnd, phase, first, last = pos
        print(f"round     {rnd}  phase {phase}  blocks {first}-{last}")
    members = chain.members()
    print(f"members   {len(members)}")
    print(f"  {'uid':>5}  {'address':<42}  {'stake':>14}  validator")
    for m in members:
        print(
            f"  {m.uid:>5}  {m.hotkey:<42}  {m.stake:>14.6f}  {'yes' if m.validator_permit else 'no'}"
        )
    if pos is not None:
        print(f"commits   {len(chain.commitments(pos[0]))} in round {pos[0]}")
    cp = chain.latest_checkpoint()
    if cp is not None:
        print(f"checkpoint round {cp.round}  {cp.digest}  {cp.uri}  block {cp.block}")
    else:
        print("checkpoint none")


def _sender(args):
    """The registry as the key given on the command line (who sends the transaction)."""
    from protocol.chain.evm import EvmChain

    return EvmChain(connect_rpc(args.rpc), args.registry, _account(args))


def _send(what: str, call) -> int:
    """Run one transaction; a revert is one line naming the contract's error."""
    from moesaic.cli import CliError
    from protocol.chain import ChainError

    try:
        result = call()
    except ChainError as e:
        raise CliError(f"{what}: {e}") from None
    print(f"{what}: {result}")
    return 0


def _register_member(args) -> int:
    chain = _sender(args)
    bond = None if args.bond is None else int(args.bond)
    return _send(f"registered {chain.address} as uid", lambda: chain.register(bond))


def _authorise(args) -> int:
    chain = _sender(args)
    allowed = not args.revoke
    verb = "authorised" if allowed else "revoked"
    return _send(f"{verb} validator {args.address}, block", lambda: chain.authorise_validator(args.address, allowed))  # fmt: skip


def _set_merger(args) -> int:
    chain = _sender(args)
    allowed = not args.revoke
    verb = "set" if allowed else "revoked"
    return _send(f"{verb} merger {args.address}, block", lambda: chain.set_merger(args.address, allowed))  # fmt: skip


def _publish_task(args) -> int:
    from protocol.identity.hashing import sha256_dir
    from protocol.moe.experts import Assignment

    assignment = Assignment.load(args.assignment)
    base_hash = sha256_dir(args.base)
    if assignment.model_hash != base_hash:
        raise ValueError(
            f"{args.assignment} was selected on base {assignment.model_hash[:16]}, "
            f"{args.base} is {base_hash[:16]}"
        )
    chain = _sender(args)
    data_hash = args.data_hash or "00" * 32
    return _send(
        "published task, id",
        lambda: chain.publish_task(base_hash, assignment.hash(), data_hash, args.data),
    )


def _key_args(p, who: str) -> None:
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument(
        "--key",
        help=f"raw hex private key of {who} (other local users can read it in the process "
        "list: prefer --keystore)",
    )
    keys.add_argument("--keystore", help=f"eth-account keystore JSON file of {who}")
    p.add_argument("--password-file", help="file holding the keystore's password")


def _tx_args(p, who: str) -> None:
    p.add_argument("--rpc", required=True, help="JSON-RPC URL, e.g. http://127.0.0.1:8545")
    p.add_argument("--registry", required=True, help="address of the deployed registry")
    _key_args(p, who)


def register(sub) -> None:
    p = sub.add_parser("chain", help="the MoesaicRegistry contract on an EVM chain")
    g = p.add_subparsers(dest="chain_command", metavar="ACTION", required=True)
    d = g.add_parser("deploy", help="deploy a registry; prints its address and schedule")
    d.add_argument("--rpc", required=True, help="JSON-RPC URL, e.g. http://127.0.0.1:8545")
    _key_args(d, "the deployer, who becomes the owner")
    d.add_argument(
        "--schedule",
        help=f"{','.join(SCHEDULE_FIELDS)} in blocks (default: defaults from the current block)",
    )
    d.add_argument("--bond", type=int, default=0, help="minimum miner bond in wei (default 0)")
    d.set_defaults(handler=_deploy)
    s = g.add_parser("status", help="block, round and phase, members, commitments, checkpoint")
    s.add_argument("--rpc", required=True, help="JSON-RPC URL")
    s.add_argument("--registry", required=True, help="address of the deployed registry")
    s.set_defaults(handler=_status)

    r = g.add_parser("register", help="register the key as a member (miners and validators)")
    _tx_args(r, "the member")
    r.add_argument("--bond", help="bond in wei (default: the registry's minimum)")
    r.set_defaults(handler=_register_member)
    a = g.add_parser("authorise-validator", help="owner: let an address set weights")
    a.add_argument("address", help="0x address of the validator")
    a.add_argument("--revoke", action="store_true", help="take the permission away")
    _tx_args(a, "the owner")
    a.set_defaults(handler=_authorise)
    m = g.add_parser("set-merger", help="owner: let an address publish checkpoints")
    m.add_argument("address", help="0x address of the merger")
    m.add_argument("--revoke", action="store_true", help="take the permission away")
    _tx_args(m, "the owner")
    m.set_defaults(handler=_set_merger)
    t = g.add_parser("publish-task", help="owner: publish a task (base, assignment, data)")
    t.add_argument("--base", required=True, help="the task's base model directory")
    t.add_argument("--assignment", required=True, help="assignment JSON selected on that base")
    t.add_argument("--data", required=True, help="the domain's data spec, e.g. corpus:math")
    t.add_argument("--data-hash", help="sha256 of the domain data, if pinned (default zeros)")
    _tx_args(t, "the owner")
    t.set_defaults(handler=_publish_task)
