"""Keys and signatures shared by every role: who said something, proven over exact bytes.

Two key types, one interface:
- Ethereum keys (eth-account) sign EIP-191 personal messages; their identity is the 0x address.
- Substrate sr25519 keys (substrate-interface `Keypair`, i.e. Bittensor hotkeys) sign raw bytes;
  their identity is the ss58 address.

`verify_signature` picks the scheme from the identity's shape, so a verifier needs only
(identity, message, signature). Heavy libraries are imported lazily: importing this module
costs nothing until a key is used.

    signer = load_signer("sr25519://Alice")          # or "0x<64 hex>" for an Ethereum key
    sig = signer.sign(b"message")
    assert verify_signature(signer.identity, b"message", sig)
"""

from __future__ import annotations

import re
from typing import Protocol

ETH_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")


class Signer(Protocol):
    """A key that can sign. `identity` is what allow-lists and registries hold."""

    identity: str  # 0x address or ss58

    def sign(self, message: bytes) -> str:
        """0x-hex signature of message."""


class EthSigner:
    """An Ethereum account signing EIP-191 personal messages."""

    def __init__(self, private_key: str | bytes):
        from eth_account import Account  # noqa: PLC0415 (moesaic --help imports this module; eth-account is heavy)

        self._account = Account.from_key(private_key)
        self.identity = self._account.address

    @property
    def account(self):
        """The eth-account LocalAccount: what an EVM chain client sends transactions with."""
        return self._account

    def sign(self, message: bytes) -> str:
        from eth_account.messages import encode_defunct  # noqa: PLC0415 (moesaic --help imports this module; eth-account is heavy)

        signed = self._account.sign_message(encode_defunct(primitive=message))
        return "0x" + bytes(signed.signature).hex()


class Sr25519Signer:
    """A substrate sr25519 keypair (a Bittensor hotkey)."""

    def __init__(self, keypair):
        self._keypair = keypair
        self.identity = keypair.ss58_address

    @property
    def keypair(self):
        """The substrate Keypair: what a subtensor chain client signs extrinsics with."""
        return self._keypair

    def sign(self, message: bytes) -> str:
        return "0x" + bytes(self._keypair.sign(message)).hex()


def load_signer(spec: str) -> Signer:
    """A signer from a key spec: `0x<64 hex>` (Ethereum private key) or `sr25519:<secret>`.

    The sr25519 secret is a substrate secret uri (`//Alice`, `MNEMONIC//hard/soft`) or a 0x seed.
    """
    spec = spec.strip()
    if spec.startswith("sr25519:"):
        from substrateinterface import Keypair  # noqa: PLC0415 (moesaic --help imports this module; substrate-interface is heavy)

        secret = spec.removeprefix("sr25519:").strip()
        if re.fullmatch(r"0x[0-9a-fA-F]{64}", secret):
            return Sr25519Signer(Keypair.create_from_seed(secret))
        return Sr25519Signer(Keypair.create_from_uri(secret))
    if re.fullmatch(r"(0x)?[0-9a-fA-F]{64}", spec):
        return EthSigner(spec if spec.startswith("0x") else "0x" + spec)
    raise ValueError("unrecognised key: expected 0x + 64 hex (Ethereum) or sr25519:<secret uri>")


# secp256k1's group order. An ECDSA signature (r, s) has a twin (r, n - s) that verifies for the
# same key and message, and recovery ids are spelt 27/28 or 0/1: three more encodings that anyone
# can derive from a published signature without the key.
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def canonical_eth_signature(sig: bytes) -> bool:
    """Whether a 65-byte r || s || v signature is the one canonical encoding: 0 < r < n,
    0 < s <= n/2 (low s, as EIP-2 requires of transactions and eth-account signs) and v 27/28.
    Accepting only it gives every signed manifest exactly one signature, so a third party cannot
    re-encode one into a second valid document with another digest."""
    if len(sig) != 65:
        return False
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")
    return 0 < r < SECP256K1_N and 0 < s <= SECP256K1_N // 2 and sig[64] in (27, 28)


def verify_signature(identity: str, message: bytes, signature: str) -> bool:
    """Whether `signature` over message was made by identity; False on any malformed input and on
    a non-canonical Ethereum encoding (high s, v = 0/1: see canonical_eth_signature)."""
    try:
        sig = bytes.fromhex(signature.removeprefix("0x"))
        if ETH_ADDRESS_RE.fullmatch(identity):
            if not canonical_eth_signature(sig):
                return False
            from eth_account import Account  # noqa: PLC0415 (moesaic --help imports this module; eth-account is heavy)
            from eth_account.messages import encode_defunct  # noqa: PLC0415 (moesaic --help imports this module; eth-account is heavy)

            recovered = Account.recover_message(encode_defunct(primitive=message), signature=sig)
            return recovered.lower() == identity.lower()
        from substrateinterface import Keypair  # noqa: PLC0415 (moesaic --help imports this module; substrate-interface is heavy)

        if len(sig) != 64:  # an sr25519 signature is exactly 64 bytes; no other spelling
            return False
        return bool(Keypair(ss58_address=identity).verify(message, sig))
    except Exception:  # hostile input must read as "not verified", never as a crash
        return False


def normalise(identity: str) -> str:
    """Ethereum addresses compare case-insensitively; ss58 addresses exactly."""
    identity = identity.strip()
    return identity.lower() if ETH_ADDRESS_RE.fullmatch(identity) else identity
