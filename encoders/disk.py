"""Free space, checked before a store batch is written, because HDF5 cannot survive running out.

Measured on a 400 KiB tmpfs: when a write inside HDF5 meets ENOSPC, h5py raises
``RuntimeError: Can't decrement id ref count (... No space left on device)``, the library's
in-memory state of that file is broken, and releasing the h5py objects afterwards segfaults the
process (so a second ``extract()`` in it never ran). The file it leaves can no longer be resized
(``addr overflow``), so only a rebuild recovered. A write that is never started breaks nothing:
the store stays at its last committed batch, its lock is released, and a rerun resumes there.
What this cannot cover: another process filling the disk between the check and the write; HDF5
then still fails as above (the error is reported as out of space, the lock released).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# Room kept for HDF5's own bookkeeping beyond the batch itself (B-tree nodes, string heap
# collections, the attribute updates that commit a batch): a batch's metadata measured < 40 KiB.
RESERVE_BYTES = 256 * 1024


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding ``path``."""
    st = os.statvfs(Path(path).parent if not Path(path).is_dir() else path)
    return st.f_bavail * st.f_frsize


def bytes_needed(new_chunks: int, chunk_bytes: int, strings_bytes: int) -> int:
    """Worst case for one batch: every chunk it touches allocated whole, its strings twice (heap + copy)."""
    return new_chunks * chunk_bytes + 2 * strings_bytes + RESERVE_BYTES


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, whether raised as OSError or wrapped in h5py's RuntimeError text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "errno = 28" in text or "Disk quota exceeded" in text
