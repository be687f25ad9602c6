"""A repository on an SMB2/SMB3 share, spoken to directly (no mount) with `smbprotocol`.

URL: ``smb://[DOMAIN;]USER@HOST[:PORT]/SHARE[/PATH]``; the password comes from the
VMKEEP_SMB_PASSWORD environment variable, never from the URL.

Why the low-level `smbprotocol` API rather than its `smbclient` convenience layer: smbclient
shares one connection per server between all threads (its pool is not guarded by a lock, and a
shared connection can run out of SMB credits under concurrent large writes), and its requests
wait for answers without a time limit. Here each thread borrows a connection of its own from a
small pool, every request has a timeout, and puts are built from the few SMB commands that
make them atomic and durable: CREATE a temp file, WRITE, FLUSH (Samba fsyncs), then rename it
over the final name with SET_INFO(FileRenameInformation).

Modules: `location` (the URL, `open_smb`), `remote` (`SmbRemote`), `files` (the file
operations on one connection), `messages` (SMB2 requests and answers), `pool` (borrowing
connections, retries), `connection` (one connection), `target` (where and as whom),
`errors` (statuses to vmkeep errors).
"""

from .files import TEMP_PREFIX
from .location import PASSWORD_ENV, open_smb
from .remote import SmbRemote
from .target import DEFAULT_PORT

__all__ = ["DEFAULT_PORT", "PASSWORD_ENV", "TEMP_PREFIX", "SmbRemote", "open_smb"]
