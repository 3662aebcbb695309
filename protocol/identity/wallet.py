"""Keys where operators already keep them: Bittensor wallets and eth-account keystores.

Bittensor wallet layout (what `btcli wallet create` writes)::

    ~/.bittensor/wallets/<name>/coldkey           the coldkey secret (usually encrypted)
    ~/.bittensor/wallets/<name>/coldkeypub.txt    the coldkey's public JSON (ss58Address, ...)
    ~/.bittensor/wallets/<name>/hotkeys/<hotkey>  the hotkey JSON: secretPhrase, secretSeed,
                                                  privateKey, publicKey, ss58Address, accountId

A role only ever needs the hotkey, so the coldkey is never decrypted or even read beyond the
few bytes that say whether it is encrypted. Hotkeys are normally stored unencrypted; one that is
not is refused with a message saying so, rather than prompting for a password in a daemon.

Keystores are the standard Web3 Secret Storage JSON (`eth_account.Account.encrypt`); the
password comes from an environment variable or a file, never from the command line (where `ps`
and shell history would see it).

Hotkey and password files another local user may read or write are refused
(protocol.identity.keyfile, ssh's rule). Nothing here prints, logs or puts a secret in an exception message: errors name files and
fields, never their contents. Public facts (ss58 address, 0x address) are fine to show.

    kp = load_hotkey(Wallet("miner", "default"))                # substrate Keypair
    account = load_keystore("key.json", password_env="MOESAIC_KEYSTORE_PASSWORD")
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_utils import to_checksum_address
from substrateinterface import Keypair

from protocol.identity.keyfile import KeyFileError, read_private, read_private_bytes

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"
DEFAULT_PASSWORD_ENV = "MOESAIC_KEYSTORE_PASSWORD"
# Prefixes of the encrypted key formats bittensor has written: NaCl secretbox (current),
# ansible-vault and Fernet ("gAAAAA", base64 of its version byte) in older releases.
_ENCRYPTED_PREFIXES = (b"$NACL", b"$ANSIBLE_VAULT", b"gAAAAA")
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SEED = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Wallet:
    """A wallet by btcli's coordinates: `--wallet.name`, `--wallet.hotkey`, `--wallet.path`."""

    name: str = "default"
    hotkey: str = "default"
    path: str = DEFAULT_WALLET_PATH

    def __post_init__(self):
        # Names become path components: refuse separators and "..", which would leave the wallet.
        for what, value in (("wallet name", self.name), ("hotkey name", self.hotkey)):
            if not _NAME.fullmatch(value) or value in (".", ".."):
                raise KeyFileError(f"{what} {value!r}: use letters, digits, '_', '-', '.'")

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser() / self.name

    @property
    def coldkey_file(self) -> Path:
        return self.root / "coldkey"

    @property
    def coldkeypub_file(self) -> Path:
        return self.root / "coldkeypub.txt"

    @property
    def hotkey_file(self) -> Path:
        return self.root / "hotkeys" / self.hotkey


@dataclass(frozen=True)
class WalletInfo:
    """Public facts about a wallet, safe to print."""

    wallet: Wallet
    hotkey_ss58: str
    coldkey_ss58: str | None  # from coldkeypub.txt; None when the file is absent
    coldkey: str  # "encrypted", "unencrypted" or "missing"


def is_encrypted(data: bytes) -> bool:
    """Whether key-file bytes are in one of bittensor's encrypted formats (or at least are not
    the plain JSON an unencrypted key file holds)."""
    head = data.lstrip()[:16]
    if head.startswith(_ENCRYPTED_PREFIXES):
        return True
    return not head.startswith(b"{")


def coldkey_state(wallet: Wallet) -> str:
    """The coldkey's state, "encrypted", "unencrypted" or "missing", from its first bytes only."""
    try:
        with wallet.coldkey_file.open("rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        return "missing"
    return "encrypted" if is_encrypted(head) else "unencrypted"


def coldkey_address(wallet: Wallet) -> str | None:
    """The coldkey's ss58 address from coldkeypub.txt (public), or None without the file."""
    try:
        doc = json.loads(wallet.coldkeypub_file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyFileError(f"{wallet.coldkeypub_file} is not JSON") from None
    address = doc.get("ss58Address") if isinstance(doc, dict) else None
    if not isinstance(address, str) or not address:
        raise KeyFileError(f"{wallet.coldkeypub_file} has no ss58Address")
    return address


def _hotkey_doc(wallet: Wallet) -> dict:
    path = wallet.hotkey_file
    if not path.is_file():
        # Say what is there: a typo in --wallet.hotkey is the usual cause.
        hotkeys = sorted(p.name for p in (wallet.root / "hotkeys").glob("*") if p.is_file())
        if hotkeys:
            known = f"hotkeys there: {', '.join(hotkeys)}"
        elif wallet.root.is_dir():
            known = f"{wallet.root} has no hotkeys"
        else:
            known = f"no wallet {wallet.name!r} under {Path(wallet.path).expanduser()}"
        raise KeyFileError(
            f"no hotkey file {path} ({known}); check --wallet.name/--wallet.hotkey/--wallet.path"
        )
    data = read_private_bytes(path, "hotkey file")  # refused when other users may read it
    if is_encrypted(data):
        raise KeyFileError(
            f"{path} is an encrypted hotkey: moesaic runs unattended and needs the hotkey "
            "unencrypted, as `btcli wallet new-hotkey` writes it by default (regenerate it "
            "without --use-password)"
        )
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyFileError(f"{path} is not a JSON hotkey file") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"{path} is not a JSON object")
    return doc


def load_hotkey(wallet: Wallet):
    """The wallet's hotkey as a substrate-interface sr25519 Keypair.

    Rebuilt from secretSeed, else secretPhrase, else privateKey (bittensor writes all three),
    then checked against the file's publicKey and ss58Address so a hand-edited file that mixes
    two keys is refused instead of signing as the wrong one.
    """
    path, doc = wallet.hotkey_file, _hotkey_doc(wallet)
    try:
        seed = doc.get("secretSeed")
        if isinstance(seed, str) and _SEED.fullmatch(seed):
            kp = Keypair.create_from_seed(seed)
        elif isinstance(doc.get("secretPhrase"), str) and doc["secretPhrase"].strip():
            kp = Keypair.create_from_mnemonic(doc["secretPhrase"].strip())
        elif isinstance(doc.get("privateKey"), str) and doc["privateKey"]:
            kp = Keypair.create_from_private_key(doc["privateKey"], ss58_format=42)
        else:
            raise KeyFileError(f"{path} has no secretSeed, secretPhrase or privateKey")
    except KeyFileError:
        raise
    except Exception:
        # The library's message may quote the secret: replace it with one that cannot.
        raise KeyFileError(f"{path}: the secret in the file is not a valid sr25519 key") from None
    public = doc.get("publicKey")
    if isinstance(public, str) and public:
        try:
            matches = bytes.fromhex(public.removeprefix("0x")) == kp.public_key
        except ValueError:
            matches = False
        if not matches:
            raise KeyFileError(f"{path}: the secret does not match the file's publicKey")
    address = doc.get("ss58Address")
    if isinstance(address, str) and address and address != kp.ss58_address:
        raise KeyFileError(f"{path}: the secret does not match the file's ss58Address")
    return kp


def inspect_wallet(wallet: Wallet) -> WalletInfo:
    """Public facts about the wallet; loads (and checks) the hotkey, never the coldkey."""
    return WalletInfo(
        wallet=wallet,
        hotkey_ss58=load_hotkey(wallet).ss58_address,
        coldkey_ss58=coldkey_address(wallet),
        coldkey=coldkey_state(wallet),
    )


# ----------------------------------------------------------------------------- keystores


def keystore_password(password_env: str = "", password_file: str = "") -> str:
    """The keystore password: the file's first line when `password_file` is set, else the
    environment variable `password_env` (default MOESAIC_KEYSTORE_PASSWORD)."""
    if password_file:
        path = Path(password_file).expanduser()
        text = read_private(path, "keystore password file")
        password = text.splitlines()[0] if text else ""
        if not password:
            raise KeyFileError(f"keystore password file {path} is empty")
        return password
    name = password_env or DEFAULT_PASSWORD_ENV
    password = os.environ.get(name)
    if not password:
        raise KeyFileError(f"the keystore password is read from ${name}, which is not set")
    return password


def keystore_address(path: str | Path) -> str | None:
    """The 0x address a keystore declares (public; no password needed), if it declares one."""
    doc = _keystore_doc(Path(path).expanduser())
    address = doc.get("address")
    if not isinstance(address, str) or not re.fullmatch(r"(0x)?[0-9a-fA-F]{40}", address):
        return None
    return to_checksum_address("0x" + address.removeprefix("0x"))


def _keystore_doc(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeyFileError(f"keystore {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KeyFileError(f"keystore {path} is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("crypto") or doc.get("Crypto"), dict):
        raise KeyFileError(f"{path} is not a Web3 Secret Storage keystore (no crypto section)")
    return doc


def load_keystore(path: str | Path, *, password_env: str = "", password_file: str = ""):
    """An eth-account LocalAccount decrypted from a keystore JSON file."""
    path = Path(path).expanduser()
    doc = _keystore_doc(path)
    password = keystore_password(password_env, password_file)
    try:
        key = Account.decrypt(doc, password)
    except ValueError:
        # eth-account says "MAC mismatch" for a wrong password; say it plainly, without it.
        raise KeyFileError(f"keystore {path}: wrong password (or a damaged file)") from None
    account = Account.from_key(key)
    declared = keystore_address(path)
    if declared is not None and declared.lower() != account.address.lower():
        raise KeyFileError(f"keystore {path}: decrypts to another address than it declares")
    return account


__all__ = [
    "DEFAULT_PASSWORD_ENV",
    "DEFAULT_WALLET_PATH",
    "KeyFileError",
    "Wallet",
    "WalletInfo",
    "coldkey_address",
    "coldkey_state",
    "inspect_wallet",
    "is_encrypted",
    "keystore_address",
    "keystore_password",
    "load_hotkey",
    "load_keystore",
]
