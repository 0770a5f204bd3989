"""Everything the server and its tools keep on disk, behind one package (DESIGN.md "Storage").

`sqlite.py` opens a database and runs a write transaction, `files.py` writes a file
atomically, and the stores build on them: `state.py` (refresh tokens, revocations),
`keys.py` (token signing keys), `history.py` (retained messages). Their I/O blocks (on the
disk, on another process's transaction or flock), so the running server calls it only from
worker threads (`chat/server/storage.py`); what the event loop reads is kept in memory: the
revocation snapshot (`StateStore.revocations`) and the signing keys (`KeyStore`). Pure
package: no trio.
"""
