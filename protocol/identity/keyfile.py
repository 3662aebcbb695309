"""Private files (key files, password files, wallet hotkeys): read only when no other user can
read or change them, written so that no other user ever could.

    text = read_private("miner.key")        # KeyFileError if group/other may read or write it
    write_private("keys/miner.key", "0x...\n")  # created 0600, never widened then narrowed

The rule is ssh's: a secret another local user can read is already leaked, and one another user
can write can be swapped for the attacker's key (the role would then sign, and earn, for the
attacker). So a mode with any group or other bit (mode & 0o077) is refused with the path and
the fix, `chmod 600 PATH`. The check follows symlinks (it is the target's mode that matters).
On Windows, where POSIX modes do not describe access, nothing is checked. Torch-free.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from protocol.ops.atomic import write_text_atomic


class KeyFileError(ValueError):
    """A key file is missing, unreadable, open to other users, encrypted where it must not be,
    or inconsistent. The message names the file, never its contents."""


def check_private(path: str | Path, what: str = "key file") -> None:
    """Refuse `path` when group or other may read or write it (ssh's rule)."""
    if os.name == "nt":
        return
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} does not exist") from None
    if mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"it must be private to its owner: run `chmod 600 {path}`"
        )


def read_private(path: str | Path, what: str = "key file") -> str:
    """The text of a private file, after `check_private`."""
    check_private(path, what)
    return Path(path).read_text()


def read_private_bytes(path: str | Path, what: str = "key file") -> bytes:
    check_private(path, what)
    return Path(path).read_bytes()


def write_private(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically, the file 0600 from its first byte: the atomic writer's
    temp file comes from mkstemp, which creates it 0600 (a chmod after writing would leave a
    window in which others can open it)."""
    write_text_atomic(path, text)


__all__ = ["KeyFileError", "check_private", "read_private", "read_private_bytes", "write_private"]
