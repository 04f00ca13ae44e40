"""Constants shared by tests (a plain module: conftest files are not for importing)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = ROOT / "data" / "models" / "xmodal-tiny-vit.json"
TINY_RN = ROOT / "data" / "models" / "xmodal-tiny-rn.json"


def make_store(path, ids, emb, normalized: bool = True) -> str:
    """A complete store written directly (no encoder): synthetic embeddings with known answers."""
    from encoders.store import StoreWriter

    attrs = {"encoder_spec": "synthetic", "weights_digest": "w", "manifest_digest": path.name,
             "normalized": normalized, "dataset": "synthetic", "modality": path.stem}
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs) as w:
        w.append(ids, emb, rows_done=len(ids))
        w.finish()
    return str(path)


def spawn_python(script, *args):
    """``python script args...`` from the repo root with the repo importable; output captured as text."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_9_after_first_checkpoint(victim, ckpt, timeout: float = 120) -> None:
    """Wait until the child has written its first checkpoint, then SIGKILL it mid-run."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while not ckpt.exists():
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
