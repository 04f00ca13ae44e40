"""README.md as a program: its fenced ```bash and ```python blocks, run in order as a user would.

A marker line right before a block says how it runs (the README says why next to it, in words):

    <!-- readme-test: server -->        starts servers: the lines that start one run in the background (their
                                        process group is stopped at the end of the walk), the others are retried
                                        until they succeed, as a user waits for a server; python blocks marked
                                        server run in a fresh process with the shell's exports (a new terminal)
    <!-- readme-test: skip: REASON -->  not run here (kept few: a GPU host, a cluster, the suite itself)
    <!-- readme-test: not: CMD -->      run, except the lines starting with CMD (the README says why)

Unmarked python blocks share one namespace (a Python session), so a later snippet uses an earlier one's names.
Run as a script from the folder to walk (a user's checkout): ``python readme_walk.py README.md [no-server]``; it
prints one line per block and exits non-zero at the first failure.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = re.compile(r"<!--\s*readme-test:\s*(server|skip|not)\s*(?::\s*(.*?))?\s*-->")
# commands that start a server and never return on their own
SERVER_CMD = re.compile(r"^(\w+=\S+ )*(make (prefect-server|worker|ui)\b|\S*xmodal serve-search\b|\S*mlflow (models serve|server|ui)\b|\S*prefect (server|worker) start\b)")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mark: str = ""  # "", "server", "skip", "not"
    arg: str = ""
    commands: list[str] = field(default_factory=list)


def blocks(readme: Path) -> list[Block]:
    """Every ```bash / ```python block, with the marker on the line before it (if any)."""
    lines, out, i = readme.read_text().splitlines(), [], 0
    while i < len(lines):
        m = re.match(r"^```(bash|python)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].startswith("```"):
            j += 1
        mark = MARK.search(lines[i - 1]) if i else None
        b = Block(i + 1, m.group(1), "\n".join(lines[i + 1:j]) + "\n", *(mark.groups("") if mark else ("", "")))
        if b.lang == "bash":
            b.commands = bash_commands(b.code)
        out.append(b)
        i = j + 1
    return out


def bash_commands(code: str) -> list[str]:
    """One entry per command: continuation lines joined, comments and blank lines dropped."""
    out, cur = [], ""
    for raw in code.splitlines():
        cur += raw.rstrip().removesuffix("\\") + (" " if raw.rstrip().endswith("\\") else "")
        if raw.rstrip().endswith("\\"):
            continue
        cmd = _strip_comment(cur).strip()
        if cmd:
            out.append(cmd)
        cur = ""
    return out


def _strip_comment(cmd: str) -> str:
    """The command without its trailing `# comment` (a # inside quotes or a word is kept)."""
    quote = None
    for k, ch in enumerate(cmd):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or cmd[k - 1].isspace()):
            return cmd[:k]
    return cmd


class Walk:
    """Runs blocks in order in the current folder; servers it starts are stopped by stop()."""

    def __init__(self, env: dict[str, str]):
        self.env, self.servers, self.ns = dict(env), [], {"__name__": "__readme__"}
        # README_PORTS="4200=41234,5000=...": the documented ports, moved to free ones on a shared machine
        self.ports = [p.split("=") for p in env.get("README_PORTS", "").split(",") if p]

    def _ports(self, text: str) -> str:
        for old, new in self.ports:
            text = re.sub(rf"(127\.0\.0\.1:|--port ){old}\b", rf"\g<1>{new}", text)
        return text

    def run(self, b: Block) -> str:
        if b.mark == "skip":
            return f"skipped ({b.arg})"
        if b.lang == "python":
            b.code = self._ports(b.code)
            if b.mark == "server":  # a fresh terminal with the exports made so far
                subprocess.run([sys.executable, "-c", b.code], env=self.env, check=True, timeout=900)
            else:
                exec(compile(b.code, f"README.md:{b.line}", "exec"), self.ns)
            return "ok"
        for cmd in map(self._ports, b.commands):
            if b.mark == "not" and cmd.startswith(b.arg):
                continue
            m = re.match(r"^export (\w+)=(\S+)$", cmd)
            if m:
                self.env[m.group(1)] = m.group(2)
            elif b.mark == "server" and SERVER_CMD.match(cmd):
                self.start(cmd)
            else:
                self.sh(cmd, retry_s=240 if b.mark == "server" else 0)
        return "ok"

    def sh(self, cmd: str, retry_s: float = 0) -> None:
        deadline = time.monotonic() + retry_s
        while True:
            res = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], env=self.env, capture_output=True, text=True,
                                 timeout=900)
            if res.returncode == 0:
                print(res.stdout[-1500:], flush=True)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"`{cmd}` exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            time.sleep(3)

    def start(self, cmd: str) -> None:
        log = open(f"server-{len(self.servers)}.log", "w")
        self.servers.append(subprocess.Popen(["bash", "-c", cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True))

    def stop(self) -> None:
        """SIGTERM each server's process group, wait, then SIGKILL (a process worker ignores SIGTERM a while)."""
        for p in self.servers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.servers:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
            try:
                os.killpg(p.pid, signal.SIGKILL)  # children that outlived their shell
            except ProcessLookupError:
                pass


def selected(b: Block, only: str | None) -> bool:
    """``only``: None = every block; 'server' = the blocks so marked; 'no-server' = every block not so marked
    (what `make test` walks: no block before a server block needs it, so the walk holds without them)."""
    if only == "no-server":
        return b.mark != "server"
    return not only or b.mark == only


def main(readme: str, only: str | None = None) -> int:
    sys.path[0] = os.getcwd()  # as in `python` started in the checkout: its folder, not this script's, is first
    walk = Walk(dict(os.environ))
    try:
        for b in blocks(Path(readme)):
            if not selected(b, only):
                continue
            t0 = time.monotonic()
            status = walk.run(b)
            print(f"README.md:{b.line} {b.lang} {b.mark or 'run'}: {status} ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        walk.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
