"""The STOMP-over-WebSocket protocol as plain code, shared by the client and the server.

`wire` holds the constants both sides must agree on (PROTOCOL.md §1–§7); `stomp` is the
STOMP 1.2 codec; `connection` is the sans-IO `StompConnection` (bytes in, typed events out;
events in, bytes out) built on it; `topics` validates destinations and matches wildcards;
`tokens` issues and verifies the certificate-bound JWTs; `errors` are the errors that carry
their wire codes. Nothing here does I/O or imports trio.
"""
