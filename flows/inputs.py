"""Paths a flow reads, checked on its first line: one message naming the field and the path.

A worker that cannot see a path fails the same way on every try; measured before, a missing manifest failed
13-25 s into the run inside a traceback. The error is a FileNotFoundError (ENOENT), which flows/errors.py already
treats as the user's to fix: one line in the CLI, no retry, no traceback in the Prefect run log.
"""

from __future__ import annotations

import errno
from pathlib import Path


def check_paths(**named: str | None) -> None:
    """Each given path must exist; the first that does not is named with its field (None: not given, skipped)."""
    for field, path in named.items():
        if path and not Path(path).exists():
            # str(exc): "[Errno 2] manifest does not exist (working folder /srv/xmodal): 'data/m.csv'"
            raise FileNotFoundError(errno.ENOENT, f"{field} does not exist (working folder {Path.cwd()})", path)
