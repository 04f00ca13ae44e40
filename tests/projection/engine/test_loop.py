"""The shared loop, checked the same way through all four trainers (stage 1, stage 2, contrastive, semi):
kill -9 and rerun ends bit-identical to an uninterrupted run, and a rerun with ANY changed setting
never resumes the old checkpoint (it is kept as ``.stale`` and the differing field is named)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from loop_cases import CASES, EPOCHS
from projection.engine import loop
from tests_support import kill_9_after_first_checkpoint, spawn_python

WORKER = Path(__file__).parents[2] / "loop_cases.py"


class _Killed(Exception):
    pass


def _stop_after_first_epoch(event, step, metrics):
    if event == "epoch":
        raise _Killed


@pytest.mark.parametrize("case", list(CASES))
def test_kill9_and_rerun_is_bit_identical(case, tmp_path):
    ref = spawn_python(WORKER, case, tmp_path / "ref_ckpt", tmp_path / "ref.pt", 0)
    victim = spawn_python(WORKER, case, tmp_path / "ckpt", tmp_path / "killed.pt", 2.0)
    ckpt = tmp_path / "ckpt" / CASES[case][1]
    kill_9_after_first_checkpoint(victim, ckpt, timeout=600)  # a loaded 2-core machine can take minutes to import
    ck = torch.load(ckpt, weights_only=True)  # tensors, numbers and strings only: no pickle code runs
    done = ck["epoch"]
    assert 1 <= done < EPOCHS and not (tmp_path / "killed.pt").exists()

    resumed = spawn_python(WORKER, case, tmp_path / "ckpt", tmp_path / "resumed.pt", 0)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed_from={done} epochs_run={EPOCHS}" in out
    ref_out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, ref_out
    assert f"resumed_from=None epochs_run={EPOCHS}" in ref_out
    a, b = torch.load(tmp_path / "resumed.pt", weights_only=True), torch.load(tmp_path / "ref.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:  # same seed, same thread count: bit-identical to the uninterrupted run
        assert torch.equal(a[k], b[k]), k


_KILLED: dict[str, Path] = {}


def _killed_checkpoint(case: str, tmp_path_factory) -> Path:
    """One run per trainer interrupted after its first epoch (its checkpoint written), reused read-only."""
    if case not in _KILLED:
        d = tmp_path_factory.mktemp(f"killed-{case}")
        with pytest.raises(_Killed):
            CASES[case][0](d, _stop_after_first_epoch)
        _KILLED[case] = d
    return _KILLED[case]


CHANGES = [
    ("stage1", {"train": {"weight_decay": 0.1}}, "train.weight_decay: 0.01 -> 0.1"),
    ("stage1", {"train": {"warmup_steps": 0}}, "train.warmup_steps: 3 -> 0"),
    ("stage1", {"projector": {"dropout": 0.2}}, "projector.dropout: 0.1 -> 0.2"),
    ("stage1", {"loss": {"temperature": 0.1}}, "initial weights"),  # the temperature is the loss's initial state
    ("stage1", {"data": {"seed": 1}}, "data"),
    ("finetune", {"finetune": {"weight_decay": 0.1}}, "finetune.weight_decay: 0.01 -> 0.1"),
    ("finetune", {"finetune": {"warmup_frac": 0.0}}, "finetune.warmup_frac: 0.2 -> 0.0"),
    ("finetune", {"finetune": {"last_n": 2}}, "finetune.last_n: 1 -> 2"),
    ("finetune", {"finetune": {"early_stop_on": "loss"}}, 'finetune.early_stop_on: "metric" -> "loss"'),
    ("contrastive", {"contrastive": {"weight_decay": 0.0}}, "contrastive.weight_decay: 0.05 -> 0.0"),
    ("contrastive", {"contrastive": {"warmup_frac": 0.2}}, "contrastive.warmup_frac: 0.0 -> 0.2"),
    ("contrastive", {"contrastive": {"crop_scale": 0.5}}, "contrastive.crop_scale: 0.7 -> 0.5"),
    ("semi", {"semi": {"mmd": 0.1}}, "semi.mmd: 0.5 -> 0.1"),
    ("semi", {"semi": {"unpaired_batch": 8}}, "semi.unpaired_batch: 16 -> 8"),
    ("semi", {"train": {"weight_decay": 0.1}}, "train.weight_decay: 0.01 -> 0.1"),
    ("semi", {"data": {"seed": 1}}, "data"),
]


@pytest.mark.parametrize("case,change,named", CHANGES, ids=[f"{c}-{n.split(':')[0]}" for c, _, n in CHANGES])
def test_a_changed_setting_never_resumes_the_old_checkpoint(case, change, named, tmp_path, tmp_path_factory, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_killed_checkpoint(case, tmp_path_factory), ckpt)
    with caplog.at_level("WARNING", logger="projection.engine.checkpoint"):
        res, _ = CASES[case][0](ckpt, changes=change)
    assert res.resumed_from_epoch is None and res.epochs_run == EPOCHS
    assert (ckpt / (CASES[case][1] + ".stale")).exists()  # the old run's checkpoint is kept, not resumed
    assert named in caplog.text


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_settings_resume(case, tmp_path, tmp_path_factory):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_killed_checkpoint(case, tmp_path_factory), ckpt)
    res, _ = CASES[case][0](ckpt)
    assert res.resumed_from_epoch == 1 and res.epochs_run == EPOCHS


def test_one_weight_decay_rule():
    """Matrices and kernels decay; biases, norms, embeddings (token, positional, class) and logit scales do not."""

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.positional_embedding = nn.Parameter(torch.zeros(5, 4))
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.bn = nn.BatchNorm2d(4)
            self.proj = nn.Linear(4, 4)
            self.logit_scale = nn.Parameter(torch.ones([]))

    t = Tower()
    groups = {g["name"]: g for g in loop.param_groups([loop.ParamSet("model", [t], 1e-3)], weight_decay=0.1)}
    names = {id(p): n for n, p in t.named_parameters()}
    assert sorted(names[id(p)] for p in groups["model"]["params"]) == ["conv.weight", "proj.weight"]
    assert groups["model"]["weight_decay"] == 0.1 and groups["model_no_decay"]["weight_decay"] == 0.0
    assert len(groups["model_no_decay"]["params"]) == len(names) - 2


@pytest.mark.parametrize("n,batch,expected", [(10, 4, [4, 4, 2]), (9, 4, [4, 4]), (1, 4, [1]), (8, 4, [4, 4]), (3, 4, [3])])
def test_one_last_batch_rule(n, batch, expected):
    gen = torch.Generator().manual_seed(0)
    batches = loop.batch_indices(n, batch, gen)
    assert [len(b) for b in batches] == expected
    assert loop.num_batches(n, batch) == len(expected)
    seen = torch.cat(batches)
    assert len(set(seen.tolist())) == len(seen)  # no item twice in an epoch; a lone leftover waits for the next shuffle
