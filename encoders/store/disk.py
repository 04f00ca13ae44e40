"""Free space: checked before each batch and before the final assembly, and what ENOSPC looks like.

Measured on a 400 KiB tmpfs with format 1 (HDF5 appended in place): when a write inside HDF5 met
ENOSPC, h5py raised ``RuntimeError: Can't decrement id ref count (... No space left on device)``,
the library's in-memory state of that file was broken, and releasing the h5py objects afterwards
segfaulted the process; with another process filling the disk between this check and the write
that was a SIGSEGV at the CLI, no error line. So correctness no longer rests on this check:
batches are appended to raw files (journal.py), where ENOSPC is a plain ``OSError`` that leaves
the last commit record in force, and HDF5 is written only by the assembler child process
(assemble.py), whose crash is reported, not inherited. The check stays because it is cheap (one
statvfs) and turns the common case into an error before any byte is written.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Room kept beyond the batch itself: the commit record (a few KiB) and, at assembly, HDF5's own
# bookkeeping (B-tree nodes, string heap collections; a batch's metadata measured < 40 KiB).
RESERVE_BYTES = 256 * 1024


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    st = os.statvfs(p if p.is_dir() else p.parent)
    return st.f_bavail * st.f_frsize


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, whether raised as OSError or wrapped in h5py's RuntimeError text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text
