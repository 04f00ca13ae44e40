"""kill -9 of a store writer, repeated: the store's kill test passes 20 times in a row, not by luck.

Trials use the light worker (benchmarks/_store_worker.py: StoreWriter fed numpy rows, no torch),
timed by benchmarks/store_torture.py's ``trial``: kills inside a batch's commit, at random
instants and inside the final assembly, each followed by ONE plain rerun. The extraction-level
kill tests (real encoder, decode workers) are tests/encoders/test_extract.py and
test_precision_and_loader.py; the full 300-trial run is benchmarks/results/store_torture.txt.
"""

from __future__ import annotations

import random
import sys

import pytest

from tests_support import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import store_torture  # noqa: E402


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_twenty_times_in_a_row_every_rerun_is_identical_on_its_first_try(tmp_path):
    rng = random.Random(19)
    refs, run_s, asm_s = {}, {}, {}
    for bs in (8, 64):
        refs[bs], run_s[bs], asm_s[bs] = store_torture.reference(tmp_path / f"ref-{bs}.h5", bs)
    passes = []
    for i in range(20):
        bs, mode = (8, 64)[i % 2], ("commit", "random", "commit", "assembly")[i % 4]
        folder = tmp_path / f"t{i}"
        folder.mkdir()
        r = store_torture.trial(folder / "s.h5", bs, mode, i % 3 == 0, rng, refs[bs], run_s[bs], asm_s[bs])
        assert r["killed"], r
        assert not r["unreadable_complete"] and not r["lost_committed"], r
        assert r["rerun_rc"] == 0 and r["identical"] and not r["leftovers"], r
        passes.append(r)
    assert len(passes) == 20
    assert sum(r["in_commit"] for r in passes) >= 5  # a quarter or more landed inside a commit
