"""Prefect's ephemeral API server dies with the process that started it, even on kill -9.

Without an API URL, Prefect starts a uvicorn subprocess per Python process and stops it from an
``atexit`` hook, which kill -9 never runs: measured before this module, every killed `xmodal`
command left a server behind (~265 MB RSS, ~5 % of a core, forever). The child is now started with
``PR_SET_PDEATHSIG = SIGTERM`` (Linux), so the kernel signals it the moment its parent goes.
Cost: one prctl call in the child at start; nothing afterwards (measured: same server start time,
no extra thread or process). The signal follows the *thread* that started the child; Prefect
starts it from the thread that first needs the API (the main thread of a CLI run, or one of its
long-lived service threads), so it does not fire early in practice.

The alternative, one shared local server started on demand, would also save each command the
server's ~12 s start, but it outlives every command by design, so someone must own stopping it:
README's Operations section runs such a server explicitly (``prefect server start``) instead.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


class _GuardedSubprocess:
    """The `subprocess` module, except that Popen children get the parent-death signal."""

    def __init__(self, real: Any):
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def Popen(self, *args: Any, **kwargs: Any):  # noqa: N802  (subprocess's own name)
        parent = os.getpid()
        kwargs.setdefault("preexec_fn", lambda: _die_with_parent(parent))
        return self._real.Popen(*args, **kwargs)


def install() -> None:
    """Guard the ephemeral server Prefect will start; a no-op with an API URL, off Linux, or twice."""
    if not sys.platform.startswith("linux") or os.environ.get("PREFECT_API_URL"):
        return
    from prefect.server.api import server

    cls = server.SubprocessASGIServer
    if getattr(cls._run_uvicorn_command, "_xmodal_guarded", False):
        return
    original = cls._run_uvicorn_command

    def run_uvicorn_command(self):
        real = server.subprocess
        server.subprocess = _GuardedSubprocess(real)
        try:
            return original(self)
        finally:
            server.subprocess = real

    run_uvicorn_command._xmodal_guarded = True
    cls._run_uvicorn_command = run_uvicorn_command
