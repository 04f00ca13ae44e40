"""README.md runs: every ```bash and ```python block, in order, in a scratch copy of the repo, as a user would
type them (tests/readme_walk.py; the few blocks marked skip say why in the README). Servers the README starts
are started as written, on free ports, and stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from readme_walk import blocks
from tests_support import ROOT

# A user's shell has none of these; the suite's own settings must not leak into the walk.
LEAKS = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME", "PREFECT_LOCAL_STORAGE_PATH", "PYTEST_CURRENT_TEST")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout(tmp_path, sample_data):
    """The repo's files, linked, in a scratch folder, with the sample data copied into data/generated: what a
    fresh clone holds after `data.build`, minus any runs, stores or mlflow.db of this worktree."""
    user = tmp_path / "xmodal"
    user.mkdir()
    for item in ROOT.iterdir():
        if item.name not in {"data", "runs", "mlflow.db", "mlflow.db.lock", "mlartifacts", ".git"}:
            (user / item.name).symlink_to(item)
    (user / "data").mkdir()
    for item in (ROOT / "data").iterdir():
        if item.name != "generated":
            (user / "data" / item.name).symlink_to(item)
    shutil.copytree(sample_data["digits"].parents[1], user / "data" / "generated",
                    ignore=shutil.ignore_patterns("manifest_*.csv"))
    return user


def walk_env(user, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKS}
    return env | {"PREFECT_HOME": str(user / ".prefect-home"), "PWD": str(user)} | extra


def test_readme_blocks_are_marked_sparingly():
    """Exceptions stay few, and each says why."""
    bs = blocks(ROOT / "README.md")
    skipped = [b for b in bs if b.mark == "skip"]
    assert len(bs) >= 12 and len(skipped) <= 5, [(b.line, b.arg) for b in skipped]
    assert all(b.arg for b in skipped)
    assert not [b.line for b in bs if "<" in b.code and ">" in b.code and b.lang == "bash" and b.mark != "skip"], "placeholders left"


def _walk(user, env, *only: str):
    res = subprocess.run([str(ROOT / ".venv/bin/python"), str(ROOT / "tests/readme_walk.py"), str(ROOT / "README.md"),
                          *only], cwd=user, env=env, capture_output=True, text=True, timeout=2300)
    print(res.stdout[-6000:])
    logs = "".join(f"\n== {f.name}\n{f.read_text()[-2000:]}" for f in sorted(user.glob("server-*.log")))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-6000:] + logs
    return [line for line in res.stdout.splitlines() if line.startswith("README.md:")]


@pytest.mark.timeout(1800)
def test_every_readme_block_without_a_server_runs(sample_data, tmp_path):
    """`make test`'s walk: every block but those marked server (they run in the next test, `make test-slow`)."""
    user = checkout(tmp_path, sample_data)
    ran = _walk(user, walk_env(user), "no-server")
    assert len(ran) == len([b for b in blocks(ROOT / "README.md") if b.mark != "server"]), ran
    assert not [line for line in ran if " server: " in line]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(2400)
def test_every_readme_block_runs(sample_data, tmp_path):
    """The whole README in order, servers included (a server block may use what the blocks before it made)."""
    user = checkout(tmp_path, sample_data)
    ports = f"4200={_free_port()},5000={_free_port()},5001={_free_port()}"
    env = walk_env(user, README_PORTS=ports, PREFECT_PORT=ports.split(",")[0].split("=")[1],
                   MLFLOW_PORT=ports.split(",")[1].split("=")[1])
    ran = _walk(user, env)
    assert len(ran) == len(blocks(ROOT / "README.md")), ran
