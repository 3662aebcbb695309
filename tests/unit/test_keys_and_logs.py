"""Keys and logs: URLs' credentials never reach `--dry-run`, logs or error lines, and key files
other users could read or write are refused (ssh's rule) while the devnet writes its own 0600."""

from __future__ import annotations

import io
import json
import logging
import os
import stat

import pytest
from substrateinterface import Keypair

from moesaic.cli import main
from moesaic.config import from_dict
from moesaic.devnet.run import cast_of, make_cast
from protocol.chain import chain_signer
from protocol.config import ChainConfig, read_key
from protocol.identity.keyfile import KeyFileError, write_private
from protocol.identity.wallet import Wallet, keystore_password, load_hotkey
from protocol.ops.logs import redact_text, redact_url, setup_logging
from protocol.round import runtime

KEY = "0x" + "ab" * 32
REGISTRY = "0x" + "12" * 20
# Secrets as they appear in real endpoints: userinfo, an Infura-style path key, an api key
# parameter, an S3 presigned URL's credential and signature, an Azure SAS signature.
SECRETS = ("hunter2", "0123456789abcdef0123456789abcdef", "APISECRET42", "AKIACRED99", "SIGf00d")
RPC = "https://alice:hunter2@mainnet.example/v3/0123456789abcdef0123456789abcdef?apikey=APISECRET42"
STORE = (
    "https://blobs.example/b?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIACRED99"
    "&X-Amz-Signature=SIGf00d&X-Amz-Expires=900"
)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (RPC, "https://mainnet.example/v3/***?apikey=***"),
        ("https://eth.example/v2/aB3dEfGh1jKlMnOpQrStUvWxYz012345", "https://eth.example/v2/***"),
        (STORE, "X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=900"),
        ("https://a.blob.example/c?sv=2020&sig=SIGf00d&se=1", "sv=2020&sig=***&se=1"),
        ("http://h:1/objects/" + "ab" * 32, "http://h:1/objects/" + "ab" * 32),  # a public digest
        ("s3://b/p?endpoint=http://h:9000&secret_key=x", "endpoint=http://h:9000&secret_key=***"),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545"),
    ],
)
def test_redact_url_masks_credentials_and_keeps_the_rest(url, shown):
    assert shown in redact_url(url)
    assert not _leaks(redact_url(url))


def test_redact_text_masks_urls_inside_library_errors():
    # What requests says when an RPC is down: the path (with its key) without the scheme.
    error = (
        "HTTPSConnectionPool(host='mainnet.example', port=443): Max retries exceeded with url: "
        "/v3/0123456789abcdef0123456789abcdef?apikey=APISECRET42 (Caused by ...); "
        f"also {STORE} and token=SIGf00d"
    )
    assert not _leaks(redact_text(error))
    assert "mainnet.example" in redact_text(error)


def test_redaction_keeps_counts_whose_names_only_contain_a_secret_word():
    """Names are matched word by word: a round's `tokens=4096` is a count, `token=` a secret."""
    line = "miner: round 1: done (tokens=4096, tokens_per_s=812.5, monkey=3, token=SIGf00d)"
    got = redact_text(line)
    assert "tokens=4096" in got and "tokens_per_s=812.5" in got and "monkey=3" in got
    assert "SIGf00d" not in got and "token=***" in got


def test_dry_run_never_prints_rpc_or_store_credentials(capsys):
    argv = ["--config", "configs/devnet.toml", "--dry-run"]
    argv += ["--set", f"chain.rpc={RPC!r}".replace("'", '"'), "--set", f'store.uri="{STORE}"']
    for role in ("miner", "validator", "merger"):
        assert main([role, "run", *argv]) == 0
        out = capsys.readouterr().out
        assert "rpc = " in out and "mainnet.example" in out and "blobs.example" in out
        assert not _leaks(out), out


def test_role_start_up_log_never_contains_credentials(monkeypatch):
    class Chain:
        def label(self):
            return "moesaic:evm:1:" + REGISTRY

        def identity(self):
            return None

    monkeypatch.setattr(runtime, "open_chain", lambda config, signer: Chain())
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        setup_logging(logging.INFO, stream)
        runtime.connect(from_dict({"chain": {"rpc": RPC}, "store": {"uri": STORE}}))
        try:
            raise OSError(f"connection to {RPC} refused")
        except OSError:
            logging.getLogger("moesaic.test").exception("a library error quoting the url")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert "mainnet.example" in text and "blobs.example" in text and "Traceback" in text
    assert not _leaks(text), text


def test_cli_error_line_never_contains_credentials(capsys):
    bad = "ftp://alice:hunter2@h/?apikey=APISECRET42"  # a wrong scheme: the error quotes the url
    assert main(["miner", "run", "--config", "configs/devnet.toml", "--dry-run",
                 "--set", f'chain.rpc="{bad}"']) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "[chain] rpc must be" in err and not _leaks(err), err


# ----------------------------------------------------------------------------- key files


def _hotkey_wallet(tmp_path) -> Wallet:
    """A wallet whose hotkey file holds only the public fields and a private key."""
    kp = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    doc = {"privateKey": "0x" + kp.private_key.hex(), "publicKey": "0x" + kp.public_key.hex()}
    wallet = Wallet("w", "hk", str(tmp_path / "wallets"))
    write_private(wallet.hotkey_file, json.dumps({**doc, "ss58Address": kp.ss58_address}))
    return wallet


READERS = {
    "chain key_file": lambda p: chain_signer(ChainConfig(key_file=str(p))),
    "store key_file": read_key,
    "keystore password file": lambda p: keystore_password(password_file=str(p)),
}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
@pytest.mark.parametrize("reader", list(READERS))
def test_key_file_open_to_other_users_is_refused(tmp_path, reader, mode):
    path = tmp_path / "secret"
    write_private(path, KEY + "\n")
    READERS[reader](path)  # 0600: accepted
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="accessible by other users") as e:
        READERS[reader](path)
    assert str(path) in str(e.value) and f"chmod 600 {path}" in str(e.value)
    assert "abab" not in str(e.value)


def test_wallet_hotkey_open_to_other_users_is_refused(tmp_path):
    wallet = _hotkey_wallet(tmp_path)
    load_hotkey(wallet)
    wallet.hotkey_file.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"hotkey file .*`chmod 600 "):
        load_hotkey(wallet)


def test_role_refuses_a_world_readable_key_before_the_network(tmp_path, capsys):
    key = tmp_path / "miner.key"
    key.write_text(KEY + "\n")
    key.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        runtime.connect(from_dict({"chain": {"key_file": str(key), "registry": REGISTRY}}))


def test_write_private_is_0600_from_creation_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        write_private(tmp_path / "k", KEY)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".k.*.tmp"))


def test_devnet_writes_its_keys_0600(tmp_path):
    old = os.umask(0o022)  # the usual umask: a plain write would leave 0644
    try:
        members = make_cast(tmp_path, cast_of(()))
    finally:
        os.umask(old)
    assert members
    for m in members:
        assert stat.S_IMODE(m.key_file.stat().st_mode) == 0o600, m.key_file
        read_key(str(m.key_file))
