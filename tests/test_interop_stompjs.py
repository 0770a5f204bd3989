"""An unmodified third-party STOMP client (@stomp/stompjs in Node) against a real server.

`./dev test` installs it with `npm ci` in tests/interop when Node is available.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from tests.conftest import RunningServer, TestPki

INTEROP = Path(__file__).parent / "interop"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (INTEROP / "node_modules" / "@stomp").is_dir(),
    reason="node or tests/interop/node_modules missing (./dev test installs them)",
)


async def run_node(script: str, pki: TestPki, server: RunningServer) -> str:
    """Run one of tests/interop's scripts against `server`; its output, once it exited 0."""
    result = await trio.run_process(
        ["node", str(INTEROP / script), str(pki.dir), str(server.port)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    return out


async def test_stompjs_connects_subscribes_publishes(start_server, pki: TestPki) -> None:
    server: RunningServer = await start_server(heartbeat=(1000, 1000))
    out = await run_node("stompjs_check.mjs", pki, server)
    assert "CONNECTED user-name=alice version=1.2 protocol=v12.stomp" in out
    assert 'MESSAGE /topic/js.room sender=alice "hello from stomp.js"' in out
    assert "DISCONNECTED" in out


ROOMS_POLICY = """\
[[rule]]
who = ["*"]
subscribe = ["lobby", "team.{sub}.#"]
publish = ["lobby"]
message = ["*"]
"""


async def test_stompjs_sees_rooms_direct_messages_and_presence(
    start_server, pki: TestPki, tmp_path: Path
) -> None:
    """PROTOCOL.md §9-§11 to the letter, as a client that is not ours sees them."""
    acl = tmp_path / "acl.toml"
    acl.write_text(ROOMS_POLICY)
    server: RunningServer = await start_server(acl=acl)
    out = await run_node("stompjs_rooms.mjs", pki, server)
    me = (
        'ME {"sub":"alice","subscribe":["lobby","team.alice.#"],"publish":["lobby"],'
        '"message":["*"],"admin":false}'
    )
    assert me in out
    assert 'DM-BOB /user/bob to=bob sender=alice "psst"' in out
    assert 'DM-ALICE /user/alice to=bob sender=alice "psst"' in out
    assert 'PRESENCE snapshot {"room":"lobby","members":[]}' in out
    assert 'PRESENCE join {"room":"lobby","who":"alice"}' in out
    assert "ERROR message=forbidden receipt-id=nope" in out
    assert "CLOSE 1008" in out
