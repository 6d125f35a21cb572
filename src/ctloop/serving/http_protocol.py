"""uvicorn's HTTP/1.1 protocol with a deadline for the first request head: a client that connects
and then sends nothing, or trickles its headers, is disconnected after `serve.header_timeout_s`
instead of holding a connection for as long as it likes. (uvicorn's keep-alive timeout starts only
after a first response; the body has its own deadline, `serve.body_timeout_s`.)

The parser is httptools (C), not h11 (pure Python): with batched generation the server's own
Python work shares the interpreter with the batcher, and parsing is a large part of it."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def head_timeout_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`, closing connections without a request head after `seconds`."""

    class HeadTimeoutHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_seen = False
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)

        def on_headers_complete(self) -> None:
            self._head_seen = True  # a request head was parsed: the connection is in use
            super().on_headers_complete()

        def _head_timed_out(self) -> None:
            # Only a connection that never delivered a request head: one idle between requests is
            # uvicorn's keep-alive timeout's business.
            if not self._head_seen and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeadTimeoutHttpToolsProtocol
