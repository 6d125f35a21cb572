"""uvicorn's HTTP/1.1 protocol with two bounds on every request head:

- a deadline for the first request head: a client that connects and then sends nothing, or
  trickles its headers, is disconnected after `serve.header_timeout_s` instead of holding a
  connection for as long as it likes (uvicorn's keep-alive timeout starts only after a first
  response; the body has its own deadline, `serve.body_timeout_s`);
- a size: a head over `serve.max_head_bytes`, or with more than `serve.max_headers` header lines,
  is answered 431 and the connection closed, counted before the parser keeps any of it (httptools
  has no limit of its own: a 64 MB header was accepted). h11 caps heads at 16 KiB, Envoy at 60 KiB
  and 100 headers.

The parser is httptools (C), not h11 (pure Python): with batched generation the server's own
Python work shares the interpreter with the batcher, and parsing is a large part of it."""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

END_OF_HEAD = b"\r\n\r\n"


def head_timeout_protocol(
    seconds: float, max_head_bytes: int = 65536, max_headers: int = 100
) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http=`: closes connections without a request head after
    `seconds`, and answers 431 to a head over `max_head_bytes` or `max_headers` lines."""

    class BoundedHeadHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._head_seen = False
            self._in_head = True  # between requests and inside a head: count what arrives
            self._head = bytearray()  # the head so far (bounded by max_head_bytes), to find its end
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(seconds, self._head_timed_out)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head += data
                end = self._head.find(END_OF_HEAD)
                head = self._head if end < 0 else self._head[:end]
                lines = head.count(b"\r\n")  # the request line ends with one, each header with one
                if len(head) > max_head_bytes or lines > max_headers:
                    self._refuse_head(len(head), lines)
                    return
                if end >= 0:
                    self._in_head, self._head = False, bytearray()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._head_seen = True  # a request head was parsed: the connection is in use
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # a keep-alive connection's next request starts with a head

        def _refuse_head(self, size: int, lines: int) -> None:
            message = (
                f"the request head has {size} bytes or more and {lines} lines, over serve.max_head_bytes="
                f"{max_head_bytes} or serve.max_headers={max_headers}; send fewer or shorter headers"
            )
            body = json.dumps(
                {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": 431}}
            ).encode()
            head = (
                "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode()
            self._in_head, self._head = False, bytearray()
            if not self.transport.is_closing():
                self.transport.write(head + body)
                self.transport.close()

        def _head_timed_out(self) -> None:
            # Only a connection that never delivered a request head: one idle between requests is
            # uvicorn's keep-alive timeout's business.
            if not self._head_seen and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return BoundedHeadHttpToolsProtocol
