"""uvicorn's HTTP/1.1 protocol with a deadline for the request head: a client that connects and
then sends nothing, or trickles its headers, is disconnected after HEADER_TIMEOUT_S instead of
holding a connection for as long as it likes. (uvicorn's keep-alive timeout starts only after a
first response; the body has its own deadline, `serve.body_timeout_s`.)"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeadTimeoutH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timed_out)

    def _head_timed_out(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request head arrived in time
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)
