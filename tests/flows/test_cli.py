"""The `xmodal` command line as a user types it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import get_origin

import numpy as np
import pytest
import typer
from pydantic import Field, create_model
from typer.main import get_command
from typer.testing import CliRunner

from data import fashion_mnist
from encoders.store import StoreWriter
from flows.cli import FLOW_COMMANDS, _is_model, app, apply_sets, nested_fields

ROOT = Path(__file__).resolve().parents[2]


def test_search_cli_returns_known_top_k_and_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(50, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"item-{i:02d}" for i in range(50)]
    with StoreWriter(tmp_path / "s.h5", dim=16, attrs={"encoder_spec": "x", "weights_digest": "w",
                                                       "manifest_digest": "m", "normalized": True}) as w:
        w.append(ids, emb, rows_done=50)
        w.finish()
    store = str(tmp_path / "s.h5")
    out = CliRunner().invoke(app, ["search", "item-07", "-t", store, "--source-store", store, "-k", "3"])
    assert out.exit_code == 0, out.output
    expected = [ids[i] for i in np.argsort(-(emb @ emb[7]))[:3]]
    lines = [line.split() for line in out.output.splitlines() if line.strip()[:1].isdigit()]
    assert [line[1] for line in lines] == expected and expected[0] == "item-07"
    too_many = CliRunner().invoke(app, ["search", "item-07", "-t", store, "--source-store", store, "-k", "51"])
    assert too_many.exit_code == 2 and "k=51" in too_many.output and "50 rows" in too_many.output
    empty = CliRunner().invoke(app, ["search", "  ", "-t", store, "--source-store", store])
    assert empty.exit_code == 2 and "empty query" in empty.output


def test_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"])
    for cmd in ("extract", "align", "finetune", "pipeline", "compare", "search", "contrastive", "demo", "build-data"):
        assert f"│ {cmd} " in out.output, cmd


@pytest.mark.parametrize("spec", FLOW_COMMANDS, ids=lambda s: s.name)
def test_each_flow_command_is_its_params_model(spec):
    """Options and arguments are the model's top-level fields, with the model's defaults; nested fields are listed."""
    model = getattr(importlib.import_module(spec.module), spec.model)
    command = get_command(app).commands[spec.name]
    got = {p.name: p for p in command.params if p.name != "set_"}
    top = {n: i for n, i in model.model_fields.items() if not _is_model(i.annotation)}
    assert set(got) == set(top)
    for name, info in top.items():
        if name in spec.positional:
            assert got[name].param_type_name == "argument" and got[name].required
        elif info.is_required():
            assert got[name].required, name
        elif get_origin(info.annotation) not in (dict, list):
            assert got[name].default == info.default, f"xmodal {spec.name} --{name}: {got[name].default!r} != {info.default!r}"
    help_text = CliRunner().invoke(app, [spec.name, "--help"], env={"COLUMNS": "200"}).output
    for dotted, default, _ in nested_fields(model):
        assert f"{dotted} = " in help_text, dotted


def test_a_field_added_to_a_model_is_on_the_command_line(monkeypatch, tmp_path):
    """The CLI is derived, not retyped: a new AlignParams field shows in --help and reaches the flow."""
    import flows.align as align_module
    from flows.cli import FlowCommand, _App, add_flow_command

    Extended = create_model("AlignParams", __base__=align_module.AlignParams,
                            knob_added_later=(int, Field(7, description="A knob that exists only in the model.")))
    seen = []
    monkeypatch.setattr(align_module, "AlignParams", Extended)
    monkeypatch.setattr(align_module, "align", seen.append)
    fresh = _App(add_completion=False)
    add_flow_command(fresh, FlowCommand("align", "flows.align", "AlignParams", "align", ("source_store", "target_store")))
    help_text = CliRunner().invoke(fresh, ["--help"], env={"COLUMNS": "200"}).output
    assert "--knob-added-later" in help_text and "A knob that exists only in the model." in help_text
    res = CliRunner().invoke(fresh, ["a.h5", "b.h5", "--knob-added-later", "9", "--set", "train.lr=0.003",
                                     "--set", "projector.hidden=64"])
    assert res.exit_code == 0, res.output
    (params,) = seen
    assert isinstance(params, Extended) and params.knob_added_later == 9
    assert (params.train.lr, params.projector.hidden, params.source_store) == (0.003, 64, "a.h5")


def test_set_parser_and_bad_values_are_one_line(tmp_path):
    cfg = apply_sets({"train": {"lr": 1e-3}}, ["train.lr=3e-4", "projector.hidden=64", "baselines.ridge_alphas=[1, 10]",
                                               "label_column=species"])
    assert cfg == {"train": {"lr": 3e-4}, "projector": {"hidden": 64}, "baselines": {"ridge_alphas": [1, 10]},
                   "label_column": "species"}
    with pytest.raises(typer.BadParameter, match="key=value"):
        apply_sets({}, ["train.lr"])
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "flows.cli", "align", "a.h5", "b.h5", "--set", "loss.terms={\"msee\": 1}"],
                         capture_output=True, text=True, cwd=ROOT)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert last.startswith("xmodal: error: invalid loss.terms.msee") and "'mse'" in last


def test_align_cli_passes_what_users_tune(prefect_server, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from tests_support import make_store

    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(120)]
    x = rng.normal(size=(120, 6)).astype(np.float32)
    a, b = make_store(tmp_path / "a.h5", ids, x), make_store(tmp_path / "b.h5", ids, np.tanh(x[:, :4]))
    sets = ["train.steps=30", "train.lr=0.003", "train.batch_size=16", "split.seed=7", "projector.hidden=32",
            "projector.depth=2", "baselines.ridge_alphas=[0.1,10]", 'loss.terms={"mse": 1, "cosine": 0.5}',
            "train.weight_decay=0"]
    res = CliRunner().invoke(app, ["align", a, b, *[x for s in sets for x in ("--set", s)], "--out-dir", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("xmodal-align-synthetic").experiment_id])[0]
    p = run.data.params
    assert (p["train.steps"], p["train.lr"], p["train.batch_size"], p["split.seed"]) == ("30", "0.003", "16", "7")
    assert (p["projector.hidden"], p["projector.depth"], p["train.weight_decay"]) == ("32", "2", "0.0")
    assert p["baselines.ridge_alphas"] == "[0.1, 10.0]" and p["loss.terms"] == '{"mse": 1.0, "cosine": 0.5}'
    assert run.data.metrics["ridge_alpha"] in (0.1, 10.0)


def test_build_data_takes_the_fashion_size():
    """`--fashion 0` (all 70,000 rows) reaches data.build from the CLI, as `python -m data.build --fashion 0` does."""
    out = CliRunner().invoke(app, ["build-data", "--help"])
    assert out.exit_code == 0 and "--fashion" in out.output and "70,000" in out.output
    bad = CliRunner().invoke(app, ["build-data", "--fashion", "many"])
    assert bad.exit_code == 2 and "--fashion" in bad.output


@pytest.mark.slow  # ~1 min: 140,000 PNGs (image + sketch) written
@pytest.mark.skipif(fashion_mnist.locate_idx(fetch=False) is None,
                    reason="Debian dataset-fashion-mnist not on this machine (run `python -m data.build` once)")
def test_build_data_fashion_0_builds_all_70000_rows(tmp_path):
    """`xmodal build-data --fashion 0` writes the whole set: both IDX splits, every class, every file."""
    import pandas as pd

    res = CliRunner().invoke(app, ["build-data", "--fashion", "0", "--out-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"fashion: {tmp_path / 'fashion' / 'manifest.csv'}" in res.output  # the real set, not the digits' stand-in
    df = pd.read_csv(tmp_path / "fashion" / "manifest.csv")
    assert len(df) == 70_000 and df["id"].is_unique
    assert df["source_split"].value_counts().to_dict() == {"train": 60_000, "test": 10_000}
    assert (df["label"].value_counts() == 7_000).all() and df["label"].nunique() == 10
    assert len(list((tmp_path / "fashion" / "images").glob("*.png"))) == 70_000
    assert len(list((tmp_path / "fashion" / "sketches").glob("*.png"))) == 70_000
