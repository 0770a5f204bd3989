"""What both ends of a chat connection must spell the same way, defined once (PROTOCOL.md).

Close codes live with the errors that carry them (`chat.protocol.errors.CloseCode`).
"""

from __future__ import annotations

import re
from typing import Final

WS_PATH: Final = "/ws"  # §1: where the server serves STOMP over WebSocket
STOMP_SUBPROTOCOLS: Final = ("v12.stomp", "v11.stomp", "v10.stomp")  # §2, best first
STOMP_SUBPROTOCOL: Final = STOMP_SUBPROTOCOLS[0]  # the version our client speaks
STOMP_VERSIONS: Final = ("1.2", "1.1", "1.0")  # CONNECT accept-version values, best first
STOMP_VERSION: Final = STOMP_VERSIONS[0]  # the version our client speaks
BEARER_PREFIX: Final = "bearer."  # §2: the access token rides in Sec-WebSocket-Protocol
TOKEN_DESTINATION: Final = "/session/token"  # §7: a SEND here renews the connection's token
# §9: an identity (a certificate CN, a JWT `sub`, an inbox name) is 1-64 of these; it is also
# a safe file name
IDENTITY: Final = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
# The most a server may be configured to accept in one frame (--max-frame-bytes, --max-headers),
# and what it adds to a SEND to make a MESSAGE (its own headers; a subscription id is short):
# a client that reads within these bounds reads whatever a conforming server sends.
MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
MAX_HEADERS: Final = 1024
MESSAGE_OVERHEAD_BYTES: Final = 16 * 1024
MESSAGE_OVERHEAD_HEADERS: Final = 16
TEXT_PLAIN: Final = "text/plain;charset=utf-8"  # the content-type of a text body


def bearer_subprotocol(token: str) -> str:
    """The `Sec-WebSocket-Protocol` entry that carries `token` (PROTOCOL.md §2)."""
    return BEARER_PREFIX + token
