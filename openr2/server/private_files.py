"""Owner-only modes for everything the server keeps on disk: the data directory 0700, its files 0600.

Batch prompts, outputs and the ledger are the users' data, so other local users must not read them. The
modes are set explicitly (os.open with a mode, then chmod), never left to the process umask. Directories
that already exist with looser modes are tightened when they are our own; a shared one (another owner, or
a sticky directory such as /tmp) is left alone with a warning, since chmod-ing it would break it for others.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger("openr2.server")

DIR_MODE, FILE_MODE = 0o700, 0o600


def private_dir(path: Path) -> None:
    """Create `path` (and parents) if missing; make it 0700 unless it is shared (see the module doc)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)  # never looser than 0700, even for a moment
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 == 0:
        return
    if st.st_uid != os.geteuid() or st.st_mode & stat.S_ISVTX:
        logger.warning("%s is open to other users (mode %o); the server's files in it stay owner-only",
                       path, stat.S_IMODE(st.st_mode))
        return
    os.chmod(path, DIR_MODE)


def private_file(path: Path, create: bool = True) -> None:
    """Make `path` 0600, creating it empty if missing and `create` (an existing file keeps its content)."""
    if create:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    elif not path.exists():
        return
    os.chmod(path, FILE_MODE)


def open_private(path: Path):
    """Open `path` for writing, truncated, as a 0600 file (a binary file object)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "wb")
