"""Store torture: kill -9 a store writer at random instants, half of them inside a batch's commit,
then ONE plain rerun (no retries); every final store must equal an uninterrupted one, byte for byte.

    python benchmarks/store_torture.py [--trials 300] [--batch-sizes 8,64,128] [--seed 0]

Each trial starts the light worker (benchmarks/_store_worker.py: StoreWriter fed numpy rows, no
torch) on a fresh store and kills it, by one of three timings, chosen in turn:

* ``commit`` (half the trials): at the k-th "committing" line, printed by the writer inside a
  batch's commit (bytes appended, not yet fsynced, the record not yet replaced), after a random
  0-2 ms delay, so the kill lands in the fsyncs, the record write or the rename;
* ``random``: after a random delay over the run's uninterrupted length (anywhere, assembly
  included; a run that ends first is counted as not killed);
* ``assembly``: a random 0-300 ms after "assembling" (the final HDF5 being built and verified).

Kills alternate between the worker alone (its assembler child, if any, finishes orphaned and
holds the lock, so the rerun waits for it) and its whole process group (the assembler dies too).
After the kill: a final store, if one exists, must be complete, readable and identical (no run
may leave an unreadable store marked complete); no committed batch may be lost. Then one rerun
must exit 0 on its first try, with a store identical to the reference (ids, embeddings and
errors compared as bytes) and no partial folder or .tmp left. Prints figures and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (the repo on sys.path)
import h5py
import numpy as np

WORKER = Path(__file__).resolve().parent / "_store_worker.py"
DIM = 32
BATCHES = 16  # batches per run: enough places to land a kill, few enough fsyncs to run 300 trials in minutes


def rows_for(bs: int) -> int:
    return bs * BATCHES - bs // 2  # a short last batch too


def spawn(store: Path, bs: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(store), str(rows_for(bs)), str(bs), str(DIM)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def reference(store: Path, bs: int) -> tuple[tuple, float, float]:
    """An uninterrupted run: its content, its wall time, and how long its final assembly took.

    The assembly's time sets how late a kill aimed at it may land: a fixed delay missed it on an idle
    machine (the worker had finished) and caught it on a loaded one."""
    t0 = time.perf_counter()
    p = spawn(store, bs)
    t_asm = None
    for line in p.stdout:
        if line.startswith("assembling"):
            t_asm = time.perf_counter()
    _, err = p.communicate()
    assert p.returncode == 0 and t_asm is not None, err
    end = time.perf_counter()
    return content(store)[:3], end - t0, end - t_asm


def content(path: Path) -> tuple[bytes, bytes, bytes, bool]:
    """(ids, embeddings, errors) as bytes, and ``complete``; raises if any of it cannot be read."""
    with h5py.File(path, "r") as f:
        ids = "\n".join(f["ids"].asstr()[()]).encode()
        emb = np.ascontiguousarray(f["embeddings"][()]).tobytes()
        errs = "\n".join(a + "\t" + b for a, b in zip(f["errors/ids"].asstr()[()], f["errors/reasons"].asstr()[()]))
        return ids, emb, errs.encode(), bool(f.attrs["complete"])


def committed_rows(store: Path) -> int:
    part = store.with_name(store.name + ".partial") / "commit.json"
    if part.exists():
        return int(json.loads(part.read_text())["rows_done"])
    return rows_for_store(store)


def rows_for_store(store: Path) -> int:
    if store.exists():
        with h5py.File(store, "r") as f:
            return int(f.attrs["rows_done"])
    return 0


def kill(proc: subprocess.Popen, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def trial(store: Path, bs: int, mode: str, group: bool, rng: random.Random, ref: tuple, run_s: float,
          asm_s: float = 0.3) -> dict:
    proc = spawn(store, bs)
    lines: list[str] = []
    last_batch = 0
    if mode == "commit":
        target = rng.randint(1, BATCHES)
        seen = 0
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("batch"):
                last_batch = int(line.split()[1])
            if line.startswith("committing"):
                seen += 1
                if seen == target:
                    time.sleep(rng.uniform(0, 0.002))
                    kill(proc, group)
                    break
    elif mode == "assembly":
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith("batch"):
                last_batch = int(line.split()[1])
            if line.startswith("assembling"):
                time.sleep(rng.uniform(0, 0.6 * asm_s))  # within the assembly as the reference run timed it
                kill(proc, group)
                break
    else:  # anywhere in the run: after a random number of committed batches, a random part of the next one
        target, batch_s = rng.randint(0, BATCHES - 1), max(run_s - asm_s, 0.01) / BATCHES
        for line in ([] if target == 0 else proc.stdout):
            lines.append(line.strip())
            if line.startswith("batch"):
                last_batch = int(line.split()[1])
                if last_batch >= target * rows_for(bs) // BATCHES:
                    break
        time.sleep(rng.uniform(0, batch_s))
        kill(proc, group)
    rest, _ = proc.communicate()
    for line in rest.splitlines():
        lines.append(line.strip())
        if line.startswith("batch"):
            last_batch = int(line.split()[1])
    killed = proc.returncode == -signal.SIGKILL
    in_commit = killed and bool(lines) and lines[-1] == "committing"
    out = {"mode": mode, "group": group, "killed": killed, "in_commit": in_commit,
           "last_line": lines[-1] if lines else ""}
    # what the kill left: nothing committed lost; a final store only complete, readable and right.
    # (An orphaned assembler still at work holds the lock: the rerun below waits for it.)
    out["orphan_assembler"] = _orphan_running(store)
    out["committed_after_kill"] = None if out["orphan_assembler"] else committed_rows(store)
    out["lost_committed"] = out["committed_after_kill"] is not None and out["committed_after_kill"] < last_batch
    out["unreadable_complete"] = False
    if store.exists():
        try:
            got = content(store)
            out["final_after_kill_ok"] = got[3] and got[:3] == ref
        except Exception:
            out["unreadable_complete"] = True
            out["final_after_kill_ok"] = False
    rerun = spawn(store, bs)
    r_out, r_err = rerun.communicate(timeout=300)
    out["rerun_rc"] = rerun.returncode
    out["rerun_error"] = r_err.strip().splitlines()[-1] if rerun.returncode else ""
    out["resumed_from"] = int(r_out.split()[1]) if r_out.startswith("start") else None
    try:
        got = content(store)
        out["identical"] = got[3] and got[:3] == ref
    except Exception as exc:
        out["identical"] = False
        out["unreadable_complete"] = out["unreadable_complete"] or "complete" in str(exc)
        out["read_error"] = str(exc).splitlines()[0]
    out["leftovers"] = sorted(p.name for p in store.parent.iterdir()
                              if p.name.endswith((".partial", ".tmp", ".new", ".del")))
    return out


def _orphan_running(store: Path) -> bool:
    """Whether an orphaned assembler still holds the store's lock."""
    import fcntl

    lock = store.with_name(store.name + ".lock")
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300)
    ap.add_argument("--batch-sizes", default="8,64,128")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="store-torture-"))
    t0 = time.perf_counter()
    refs, run_s, asm_s = {}, {}, {}
    for bs in sizes:
        refs[bs], run_s[bs], asm_s[bs] = reference(root / f"ref-{bs}.h5", bs)
        print(f"reference batch {bs}: {rows_for(bs)} rows in {BATCHES} batches, {run_s[bs]:.2f} s uninterrupted "
              f"({asm_s[bs]:.2f} s assembling)")
    modes = ["commit", "random", "commit", "assembly"]
    results = []
    for i in range(args.trials):
        bs = sizes[i % len(sizes)]
        mode, group = modes[i % len(modes)], (i // len(sizes)) % 2 == 1
        folder = root / f"t{i:04d}"
        folder.mkdir()
        r = trial(folder / "s.h5", bs, mode, group, rng, refs[bs], run_s[bs], asm_s[bs]) | {"trial": i, "batch_size": bs}
        results.append(r)
        if not r["identical"] or r["rerun_rc"] or r["unreadable_complete"] or r["lost_committed"] or r["leftovers"]:
            print(f"FAILED trial {i}: {json.dumps(r)}", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        if (i + 1) % 25 == 0:
            print(f"{i + 1} trials, {sum(x['identical'] for x in results)} identical, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)

    def count(pred) -> int:
        return sum(1 for r in results if pred(r))

    summary = {
        "trials": len(results),
        "killed": count(lambda r: r["killed"]),
        "kills_inside_commit": count(lambda r: r["in_commit"]),
        "kills_in_assembly": count(lambda r: r["killed"] and r["last_line"] == "assembling"),
        "kills_of_process_group": count(lambda r: r["group"]),
        "reruns_that_waited_for_an_orphaned_assembler": count(lambda r: r["orphan_assembler"]),
        "by_mode": {m: count(lambda r, m=m: r["mode"] == m) for m in ("commit", "random", "assembly")},
        "by_batch_size": {str(b): count(lambda r, b=b: r["batch_size"] == b) for b in sizes},
        "reruns_ok_first_try": count(lambda r: r["rerun_rc"] == 0),
        "resumed_past_row_0": count(lambda r: (r["resumed_from"] or 0) > 0),
        "identical": count(lambda r: r["identical"]),
        "unreadable_complete": count(lambda r: r["unreadable_complete"]),
        "complete_after_kill_and_identical": count(lambda r: r.get("final_after_kill_ok") is True),
        "lost_committed_batches": count(lambda r: r["lost_committed"]),
        "leftover_files": count(lambda r: bool(r["leftovers"])),
        "seconds": round(seconds, 1),
    }
    print(f"{summary['trials']} kill -9 trials over batch sizes {sizes}: {summary['kills_inside_commit']} kills inside "
          f"a commit, {summary['kills_in_assembly']} inside the final assembly, "
          f"{summary['kills_of_process_group']} of the whole process group")
    print(f"one plain rerun each: {summary['reruns_ok_first_try']} exited 0, {summary['identical']} stores "
          f"identical to an uninterrupted run, {summary['unreadable_complete']} unreadable stores marked complete, "
          f"{summary['lost_committed_batches']} committed batches lost, {summary['leftover_files']} with leftovers "
          f"({seconds:.0f} s)")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    s = main()
    ok = s["identical"] == s["trials"] and not s["unreadable_complete"] and not s["lost_committed_batches"]
    sys.exit(0 if ok else 1)
