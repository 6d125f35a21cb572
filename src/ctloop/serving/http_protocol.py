"""uvicorn's HTTP/1.1 protocol with a deadline for the first request head: a client that connects
and then sends nothing, or trickles its headers, is disconnected after `serve.header_timeout_s`
instead of holding a connection for as long as it likes. (uvicorn's keep-alive timeout starts only
after a first response; the body has its own deadline, `serve.body_timeout_s`.)"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def head_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """The protocol class for uvicorn's `http=`, closing connections without a request head after `seconds`."""

    class HeadTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_seen = False
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None:  # a request head was parsed: the connection is in use
                self._head_seen = True

        def _head_timed_out(self) -> None:
            # Only a connection that never delivered a request head: one idle between requests is
            # uvicorn's keep-alive timeout's business.
            if not self._head_seen and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeadTimeoutH11Protocol
