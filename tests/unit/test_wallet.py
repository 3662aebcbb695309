"""Keys from where operators keep them: a btcli-layout Bittensor wallet and an eth-account
keystore. Loading works, failures say what is wrong, and no secret reaches stdout, a log or an
error message (dry runs included)."""

from __future__ import annotations

import json
import logging
import os

import pytest

from moesaic.cli import main
from moesaic.config import check_runnable, load_config
from protocol.identity.wallet import (
    KeyFileError,
    Wallet,
    coldkey_state,
    inspect_wallet,
    keystore_address,
    load_hotkey,
    load_keystore,
)


@pytest.fixture(autouse=True)
def _private_umask():
    """Files these tests write are 0600, as btcli writes key files: a key file other users may
    read is refused (protocol.identity.keyfile)."""
    old = os.umask(0o077)
    yield
    os.umask(old)


PASSWORD = "correct horse battery staple 42"


def _hex(value) -> str:
    # substrate-interface hands the seed back as bytes or as 0x-hex depending on how it was made.
    return value.hex() if isinstance(value, bytes) else value.removeprefix("0x")


def _key_json(kp, mnemonic: str | None) -> dict:
    """The JSON btcli (bittensor-wallet) writes for an unencrypted key file."""
    return {
        "accountId": "0x" + kp.public_key.hex(),
        "publicKey": "0x" + kp.public_key.hex(),
        "privateKey": "0x" + kp.private_key.hex(),
        "secretPhrase": mnemonic,
        "secretSeed": "0x" + _hex(kp.seed_hex),
        "ss58Address": kp.ss58_address,
    }


@pytest.fixture
def wallet_dir(tmp_path):
    """~/.bittensor/wallets/<name>/{coldkey (encrypted), coldkeypub.txt, hotkeys/<hotkey>}."""
    from substrateinterface import Keypair

    root = tmp_path / "wallets"
    cold_m, hot_m = Keypair.generate_mnemonic(), Keypair.generate_mnemonic()
    cold, hot = Keypair.create_from_mnemonic(cold_m), Keypair.create_from_mnemonic(hot_m)
    w = root / "miner"
    (w / "hotkeys").mkdir(parents=True)
    (w / "hotkeys" / "hk0").write_text(json.dumps(_key_json(hot, hot_m)))
    public = {
        k: v
        for k, v in _key_json(cold, None).items()
        if k in ("accountId", "publicKey", "ss58Address")
    }
    (w / "coldkeypub.txt").write_text(json.dumps(public))
    # What an encrypted coldkey looks like on disk: "$NACL" + ciphertext; never decrypted here.
    (w / "coldkey").write_bytes(b"$NACL" + os.urandom(96))
    secrets = [hot_m, hot.private_key.hex(), _hex(hot.seed_hex), cold_m]
    return root, hot, cold, secrets


def test_hotkey_loads_from_the_standard_layout(wallet_dir):
    root, hot, cold, _ = wallet_dir
    wallet = Wallet("miner", "hk0", str(root))
    kp = load_hotkey(wallet)
    assert kp.ss58_address == hot.ss58_address
    assert kp.public_key == hot.public_key
    message = b"moesaic"
    assert hot.verify(message, kp.sign(message))  # it is the same secret, not just the address
    info = inspect_wallet(wallet)
    assert info.hotkey_ss58 == hot.ss58_address
    assert info.coldkey_ss58 == cold.ss58_address
    assert info.coldkey == "encrypted"


def test_hotkey_from_phrase_or_private_key_only(wallet_dir):
    root, hot, _, _ = wallet_dir
    path = root / "miner" / "hotkeys" / "hk0"
    doc = json.loads(path.read_text())
    for drop in (("secretSeed",), ("secretSeed", "secretPhrase")):
        trimmed = {k: v for k, v in doc.items() if k not in drop}
        (root / "miner" / "hotkeys" / "alt").write_text(json.dumps(trimmed))
        assert load_hotkey(Wallet("miner", "alt", str(root))).ss58_address == hot.ss58_address


def test_coldkey_state_plain_and_missing(wallet_dir):
    root, _, _, _ = wallet_dir
    wallet = Wallet("miner", "hk0", str(root))
    wallet.coldkey_file.write_text('{"secretPhrase": "x"}')
    assert coldkey_state(wallet) == "unencrypted"
    wallet.coldkey_file.unlink()
    assert coldkey_state(wallet) == "missing"
    assert inspect_wallet(wallet).coldkey == "missing"  # the hotkey alone is enough to run


def test_hotkey_failures_are_explicit_and_secret_free(wallet_dir):
    root, hot, _, secrets = wallet_dir
    hotkeys = root / "miner" / "hotkeys"
    with pytest.raises(KeyFileError, match="hotkeys there: hk0"):
        load_hotkey(Wallet("miner", "typo", str(root)))
    with pytest.raises(KeyFileError, match="no wallet 'nobody'"):
        load_hotkey(Wallet("nobody", "hk0", str(root)))
    (hotkeys / "enc").write_bytes(b"$NACL" + os.urandom(64))
    with pytest.raises(KeyFileError, match="encrypted hotkey"):
        load_hotkey(Wallet("miner", "enc", str(root)))
    doc = json.loads((hotkeys / "hk0").read_text())
    from substrateinterface import Keypair

    other = Keypair.create_from_mnemonic(Keypair.generate_mnemonic())
    doc["publicKey"] = "0x" + other.public_key.hex()
    (hotkeys / "mixed").write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="does not match") as e:
        load_hotkey(Wallet("miner", "mixed", str(root)))
    assert not any(s in str(e.value) for s in secrets)
    bad = {"secretSeed": "0x" + "zz" * 32, "secretPhrase": "not a mnemonic at all " + secrets[0]}
    (hotkeys / "bad").write_text(json.dumps(bad))
    with pytest.raises(KeyFileError) as e:
        load_hotkey(Wallet("miner", "bad", str(root)))
    assert secrets[0] not in str(e.value)
    with pytest.raises(KeyFileError, match="wallet name"):
        Wallet("../etc", "hk0", str(root))


@pytest.fixture
def keystore(tmp_path):
    from eth_account import Account

    account = Account.create()
    path = tmp_path / "keystore.json"
    path.write_text(json.dumps(Account.encrypt(account.key, PASSWORD, kdf="scrypt", iterations=2)))
    return path, account


def test_keystore_loads_with_password_from_env_or_file(keystore, tmp_path, monkeypatch):
    path, account = keystore
    assert keystore_address(path) == account.address  # public, no password needed
    monkeypatch.setenv("MY_PW", PASSWORD)
    assert load_keystore(path, password_env="MY_PW").key == account.key
    pw_file = tmp_path / "pw"
    pw_file.write_text(PASSWORD + "\n")
    monkeypatch.delenv("MY_PW")
    assert load_keystore(path, password_file=str(pw_file)).address == account.address


def test_keystore_failures_never_show_the_password_or_key(keystore, monkeypatch):
    path, account = keystore
    monkeypatch.delenv("MOESAIC_KEYSTORE_PASSWORD", raising=False)
    with pytest.raises(KeyFileError, match=r"\$MOESAIC_KEYSTORE_PASSWORD, which is not set"):
        load_keystore(path)
    monkeypatch.setenv("MOESAIC_KEYSTORE_PASSWORD", PASSWORD + "x")
    with pytest.raises(KeyFileError, match="wrong password") as e:
        load_keystore(path)
    assert PASSWORD not in str(e.value) and account.key.hex() not in str(e.value)
    path.write_text("{}")
    with pytest.raises(KeyFileError, match="not a Web3 Secret Storage keystore"):
        load_keystore(path)


def _config(tmp_path, chain_lines: str):
    path = tmp_path / "role.toml"
    path.write_text(
        '[chain]\nregistry = "0x' + "11" * 20 + f'"\n{chain_lines}\n'
        f'[task]\nbase_dir = "{tmp_path}"\nassignment = "{tmp_path / "role.toml"}"\n'
        "[metrics]\nport = 9101\n[miner]\n[validator]\n[merger]\n"
    )
    return path


def test_config_takes_exactly_one_key_source(tmp_path, keystore):
    path, _ = keystore
    both = _config(tmp_path, f'key_file = "k"\nkeystore = "{path}"')
    with pytest.raises(ValueError, match="exactly one key source, got key_file and keystore"):
        load_config(both)
    wallet = load_config(_config(tmp_path, 'wallet_name = "miner"\nwallet_hotkey = "hk0"'))
    assert (wallet.chain.wallet_name, wallet.chain.wallet_hotkey) == ("miner", "hk0")
    assert wallet.metrics.port == 9101
    # A Bittensor hotkey is sr25519: an EVM chain cannot take it, and run says so before starting.
    with pytest.raises(ValueError, match="sr25519 key and cannot sign EVM"):
        check_runnable(wallet, "miner")
    config = load_config(_config(tmp_path, f'keystore = "{path}"'))
    check_runnable(config, "validator")  # a keystore on disk satisfies run's checks


def test_dry_run_with_wallet_flags_shows_identity_not_secrets(wallet_dir, tmp_path, capsys, caplog):
    root, hot, cold, secrets = wallet_dir
    config = _config(tmp_path, 'key_file = "/nonexistent/key"')
    caplog.set_level(logging.DEBUG)
    args = ["miner", "run", "--config", str(config), "--dry-run", "--wallet.name", "miner"]
    args += ["--wallet.hotkey", "hk0", "--wallet.path", str(root)]
    assert main(args) == 0
    out = capsys.readouterr().out
    # The flags replaced the file's key_file (one key source) and are shown resolved.
    assert 'wallet_name = "miner"' in out and 'wallet_hotkey = "hk0"' in out
    assert 'key_file = ""' in out.split("[store]")[0]
    assert f"hotkey {hot.ss58_address} (coldkey {cold.ss58_address}, encrypted)" in out
    printed = out + caplog.text
    for secret in secrets:
        assert secret not in printed


def test_dry_run_with_keystore_shows_address_not_key(
    keystore, tmp_path, capsys, caplog, monkeypatch
):
    path, account = keystore
    monkeypatch.setenv("MOESAIC_KEYSTORE_PASSWORD", PASSWORD)
    config = _config(tmp_path, f'keystore = "{path}"')
    caplog.set_level(logging.DEBUG)
    assert main(["validator", "run", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"keystore address {account.address}" in out
    load_keystore(path)  # the run path's loading, under the same captured logs
    printed = out + caplog.text
    assert PASSWORD not in printed
    assert account.key.hex().removeprefix("0x") not in printed


def test_chain_signer_from_each_key_source(wallet_dir, keystore, tmp_path, monkeypatch):
    from protocol.chain import chain_signer
    from protocol.config import ChainConfig

    root, hot, _, _ = wallet_dir
    wallet = chain_signer(
        ChainConfig(wallet_name="miner", wallet_hotkey="hk0", wallet_path=str(root))
    )
    assert wallet.identity == hot.ss58_address and wallet.keypair.ss58_address == hot.ss58_address
    path, account = keystore
    monkeypatch.setenv("MY_PW", PASSWORD)
    from_keystore = chain_signer(ChainConfig(keystore=str(path), keystore_password_env="MY_PW"))
    assert from_keystore.identity == from_keystore.account.address == account.address
    key = tmp_path / "key"
    key.write_text("0x" + "11" * 32 + "\n")
    assert chain_signer(ChainConfig(key_file=str(key))).identity.startswith("0x")
    assert chain_signer(ChainConfig()) is None  # no key: a read-only client
    key.write_text("0x" + "cd" * 31 + "zz")
    with pytest.raises(ValueError, match="not a recognised key") as e:
        chain_signer(ChainConfig(key_file=str(key)))
    assert "cdcd" not in str(e.value)
