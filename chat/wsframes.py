"""Server-to-client WebSocket data frames, built once and shared between connections.

The server negotiates no WebSocket extensions, so an unmasked, unfragmented data frame
depends only on its payload: the same bytes can go to every recipient. wsproto's
`FrameProtocol` builds them (we never hand-roll RFC 6455 framing); sending a complete
message each time leaves it with no state between calls.
"""

from __future__ import annotations

from wsproto.frame_protocol import FrameProtocol

_FRAMER = FrameProtocol(client=False, extensions=[])


def data_frame(payload: bytes) -> bytes:
    """One complete WebSocket message: text when the STOMP frame is valid UTF-8, else binary.

    Text frames keep browser clients (stomp.js) on their simplest path; binary bodies
    still get through intact (RFC 6455 §5.6 forbids invalid UTF-8 in text frames).
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return bytes(_FRAMER.send_data(payload, fin=True))
    return bytes(_FRAMER.send_data(text, fin=True))
