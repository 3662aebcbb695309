"""Log hygiene: keep third-party chatter out of our output and credentials out of every line.

    redact_url("https://user:pw@rpc.example/v3/<key>?apikey=K")  # https://rpc.example/v3/***?apikey=***
    redact_text(str(exc))        # every URL (and bare key=value secrets) in free text
    setup_logging()              # a role process's root handler, redacting every record

Our own progress bars use tqdm directly and are unaffected by `quiet_third_party`; call it
before importing transformers; environment variables already set by the user win.

Redaction errs on the side of hiding: an RPC URL's userinfo, query values whose names look like
keys, tokens, signatures or credentials (S3 presigned URLs' X-Amz-*, Azure's sig=, apikey=), and
path segments that look like API keys (Infura's /v3/<32 hex>, Alchemy's /v2/<key>) become ***.
A 64-hex path segment is kept: it is a sha256 content address (`/objects/<sha256>`), public by
design, and the logs need it to say which object failed. Torch-free.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# Query names whose values are secrets: api keys, tokens, passwords, signatures (S3's
# X-Amz-Signature / X-Amz-Credential / X-Amz-Security-Token, Azure SAS `sig`, `Signature=`).
# Matched word by word (split at _ . -), never as a substring: `tokens=4096` and
# `tokens_per_s=` in a round's log line are counts, not secrets.
_SECRET_WORDS = frozenset(
    [
        "key",
        "apikey",
        "accesskey",
        "secretkey",
        "secret",
        "token",
        "sessiontoken",
        "pass",
        "passwd",
        "password",
        "pwd",
        "sig",
        "signature",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "session",
        "bearer",
    ]
)
# A path segment that looks like an API key: long, letters and digits mixed.
_TOKEN_SEGMENT = re.compile(r"(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{20,}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A URL in free text: scheme://..., up to whitespace, a quote or a bracket.
_URL_IN_TEXT = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>()\[\]{}]+")
# requests/urllib3 name the request path without its scheme: "... with url: /v3/KEY?x=y".
_BARE_PATH = re.compile(r"(\burl: )(/[^\s'\"<>()]*)")
# key=value pairs outside a URL (headers echoed in errors, query strings cut from their URL).
_PAIR = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z0-9_.-]+)=([^&\s'\"<>;,)]+)")


def redact_url(url: str) -> str:
    """`url` with userinfo, secret-named query values and key-like path segments masked.

    Not a URL (no scheme): returned with only its key=value secrets masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unbalanced [ in the netloc: mask what looks like a secret
        return _redact_pairs(url)
    if not parts.scheme:
        return _redact_pairs(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # userinfo dropped, as a browser's address bar does
    path = "/".join(_redact_segment(s) for s in parts.path.split("/"))
    query = _redact_pairs(parts.query)
    fragment = _redact_pairs(parts.fragment)
    return urlunsplit(parts._replace(netloc=netloc, path=path, query=query, fragment=fragment))


def redact_text(text: str) -> str:
    """Free text (a log line, an exception message) with every URL in it redacted, plus bare
    `name=value` secrets and request paths that libraries print without their scheme."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _BARE_PATH.sub(lambda m: m.group(1) + _redact_path_query(m.group(2)), text)
    return _redact_pairs(text)


def _redact_path_query(path: str) -> str:
    path, sep, query = path.partition("?")
    return "/".join(_redact_segment(s) for s in path.split("/")) + sep + _redact_pairs(query)


def _redact_segment(segment: str) -> str:
    if _SHA256.fullmatch(segment) or not _TOKEN_SEGMENT.fullmatch(segment):
        return segment
    return MASK


def _redact_pairs(text: str) -> str:
    def one(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        return f"{name}={MASK}" if _secret_name(name) and value != MASK else m.group(0)

    return _PAIR.sub(one, text)


def _secret_name(name: str) -> bool:
    return any(w in _SECRET_WORDS for w in re.split(r"[_.-]", name.lower()))


class RedactingFormatter(logging.Formatter):
    """A Formatter whose whole output (message, arguments, traceback) passes `redact_text`:
    a library's exception that quotes an RPC URL cannot leak its key through our logs."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """A role process's logging: one stderr handler whose lines are redacted."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per store request


def quiet_third_party() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
