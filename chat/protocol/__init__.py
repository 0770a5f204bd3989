"""The STOMP-over-WebSocket protocol as plain code, shared by the client and the server.

`wire` holds the constants both sides must agree on (PROTOCOL.md §1–§7); `connection`
is the sans-IO `StompConnection` (bytes in, typed events out; events in, bytes out),
built on the codec in `chat.stomp`. Nothing here does I/O or imports trio.
"""
