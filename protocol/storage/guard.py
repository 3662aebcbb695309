"""Connection limits for the blob server: header and stall timeouts, a cap on open connections.

uvicorn's HTTP/1.1 protocol (h11) has a keep-alive timeout but none for a request that never
completes: a client that connects and sends nothing, or sends its headers one byte a second
(slowloris), holds a socket, a file descriptor and a task forever, and enough of them exhaust
the process's descriptors without any key. `guarded_protocol(limits)` is that protocol with:

- a header deadline: a request head must be complete within `header_timeout_s` of the
  connection opening (or of the previous response ending); the byte-a-second client is cut off
  at the deadline however many bytes it sent;
- a stall timeout: a body that sends no byte for `stall_timeout_s`, or a reader that takes no
  byte of the response for as long (the socket's write buffer stays full), is cut off;
- at most `max_connections` open at once: a new connection past the cap first evicts the
  oldest connection still waiting for its request head (it has sent no complete request: a
  real client sends its head at once, so that is where idle and slow clients sit); only when
  every connection is serving a request is the new one refused with 503 (clients retry 5xx).

So open descriptors stay below about 2 x max_connections (a socket, plus a file per request
being served), whatever the number of clients.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take, and how many connections are served at once."""

    header_timeout_s: float = 10.0
    stall_timeout_s: float = 60.0
    max_connections: int = 256

    def __post_init__(self):
        for name in ("header_timeout_s", "stall_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        n = self.max_connections
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_connections must be a positive integer, got {n!r}")


_BUSY_BODY = json.dumps(
    {"error": "busy", "message": "every connection is serving a request; retry shortly"}
).encode()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"connection: close\r\nretry-after: 1\r\ncontent-length: %d\r\n\r\n" % len(_BUSY_BODY)
) + _BUSY_BODY


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class with `limits` enforced (pass it as uvicorn's `http=`)."""

    class GuardedH11Protocol(_Guarded):
        pass

    GuardedH11Protocol.limits = limits
    return GuardedH11Protocol


class _Guarded(H11Protocol):
    limits: ConnectionLimits = ConnectionLimits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer = self._stall_timer = None
        self._waiting_since = time.monotonic()  # waiting for a request head since
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            self.connections.discard(self)
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        self._arm_header_deadline()

    def _evict_one(self) -> bool:
        """Close the oldest connection that has not sent a complete request head."""
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, _Guarded) and c._waiting_for_head()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._waiting_since)
        oldest._drop()
        return True

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _drop(self) -> None:
        self.connections.discard(self)  # its slot is free at once, not when the close completes
        self._cancel_timers()
        self.transport.close()

    # -- timers -----------------------------------------------------------------------------
    def _arm_header_deadline(self) -> None:
        self._waiting_since = time.monotonic()
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._header_deadline
        )

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._waiting_for_head():
            self._drop()

    def _arm_stall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
        self._stall_timer = self.loop.call_later(self.limits.stall_timeout_s, self._stalled)

    def _stalled(self) -> None:
        self._stall_timer = None
        reading_body = self.conn.their_state is h11.SEND_BODY and not self.flow.read_paused
        if reading_body or self.flow.write_paused:
            self.connections.discard(self)
            self.transport.abort()  # a stuck write buffer would keep a graceful close waiting
        elif self.conn.their_state is h11.SEND_BODY:
            self._arm_stall()  # we paused reading (our disk is slow): not the client's fault

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._stall_timer = None

    # -- uvicorn's hooks --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self._arm_stall()  # every byte of body restarts the stall clock
        elif state is not h11.IDLE and self._stall_timer is not None and not self.flow.write_paused:
            self._stall_timer.cancel()
            self._stall_timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()  # a kept-alive connection waits for its next head

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_stall()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._stall_timer is not None and self.conn.their_state is not h11.SEND_BODY:
            self._stall_timer.cancel()
            self._stall_timer = None

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        super().connection_lost(exc)


__all__ = ["BUSY_RESPONSE", "ConnectionLimits", "guarded_protocol"]
