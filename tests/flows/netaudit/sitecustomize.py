"""Loaded by every Python process started with this folder on PYTHONPATH (the run and its Prefect
server): records each name lookup or connection to a host that is not this machine."""

import os
import sys

_LOG = os.environ.get("XMODAL_NET_AUDIT_LOG")
_LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}


def _hook(event, args):
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect" and isinstance(args[1], tuple):
        host = args[1][0]
    else:
        return
    if isinstance(host, bytes):
        host = host.decode()
    if host in _LOCAL or str(host).startswith("127."):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {event} {host}\n")


if _LOG:
    sys.addaudithook(_hook)
