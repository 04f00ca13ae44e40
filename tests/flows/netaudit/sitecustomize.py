"""Loaded by every Python process started with this folder on PYTHONPATH (the run and its Prefect
server, or servers started with `make`): records each name lookup or connection to a host that is not
this machine. With XMODAL_NET_AUDIT_CANARY set, each process also looks up `canary.invalid` at start
(the hook refuses it before any resolver runs), so the log proves the hook was active in that process."""

import os
import sys

_LOG = os.environ.get("XMODAL_NET_AUDIT_LOG")
_LOCAL = {"localhost", "127.0.0.1", "::1", "0.0.0.0", "", None}
_EVENTS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.connect"}


def _hook(event, args):
    if event not in _EVENTS:
        return
    if event == "socket.connect":
        if not isinstance(args[1], tuple):
            return
        host = args[1][0]
    else:
        host = args[0]
    if isinstance(host, bytes):
        host = host.decode()
    if host in _LOCAL or str(host).startswith("127."):
        return
    with open(_LOG, "a") as f:
        f.write(f"{os.getpid()} {event} {host}\n")
    if host == "canary.invalid" and os.environ.get("XMODAL_NET_AUDIT_CANARY"):
        raise OSError("canary lookup refused by the audit hook")


if _LOG:
    sys.addaudithook(_hook)
    if os.environ.get("XMODAL_NET_AUDIT_CANARY"):
        import socket

        try:
            socket.getaddrinfo("canary.invalid", 80)
        except OSError:
            pass
