"""Stage 1 with labels from anywhere: string classes, prompts matched by value, transfer, clean failures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from encoders.manifest import ManifestError
from encoders.store import StoreWriter
from flows.align import AlignParams, align
from flows.cli import app

CLASSES = ["cat", "dog", "eel"]
FAST = {"steps": 40, "batch_size": 32}


def _store(path, ids, emb, manifest=None, modality=None) -> str:
    attrs = {"encoder_spec": "synthetic", "weights_digest": "w", "manifest_digest": path.name, "normalized": False,
             "dataset": "labelled", "modality": modality or path.stem}
    if manifest is not None:
        attrs["manifest_path"] = str(manifest)
    with StoreWriter(path, dim=emb.shape[1], attrs=attrs) as w:
        w.append(ids, emb.astype(np.float32), rows_done=len(ids))
        w.finish()
    return str(path)


@pytest.fixture()
def labelled(tmp_path):
    """Source and target stores WITHOUT labels, labels as strings in a separate manifest, class prompts shuffled."""
    rng = np.random.default_rng(0)
    n, ids = 300, [f"x{i:03d}" for i in range(300)]
    centres = rng.normal(size=(3, 8)) * 3
    label = rng.integers(0, 3, size=n)
    y = centres[label] + 0.5 * rng.normal(size=(n, 8))
    x = y @ rng.normal(size=(8, 6)) + 0.1 * rng.normal(size=(n, 6))
    pd.DataFrame({"id": ids, "species": [CLASSES[c] for c in label]}).to_csv(tmp_path / "labels.csv", index=False)
    order = [2, 0, 1]  # prompts in another order than the labels' first appearance: matched by value
    pd.DataFrame({"id": [f"c{k}" for k in order], "species": [CLASSES[k] for k in order]}).to_csv(tmp_path / "classes.csv", index=False)
    return {"source": _store(tmp_path / "src.h5", ids, x), "target": _store(tmp_path / "tgt.h5", ids, y),
            "classes": _store(tmp_path / "cls.h5", [f"c{k}" for k in order], centres[order], tmp_path / "classes.csv", "species"),
            "labels": str(tmp_path / "labels.csv"), "out": tmp_path / "runs"}


def test_string_labels_from_another_manifest_give_zero_shot_class_r1_and_transfer(prefect_server, mlflow_uri, labelled):
    out = align(AlignParams(source_store=labelled["source"], target_store=labelled["target"], label_column="species",
                            label_manifest=labelled["labels"], class_store=labelled["classes"], train=FAST,
                            out_dir=str(labelled["out"])))
    m = out["metrics"]
    assert m["projector"]["zeroshot_acc"] > 0.9 and m["ridge"]["zeroshot_acc"] > 0.9  # three classes: chance 1/3
    assert m["projector"]["p2t_class_r1"] > 0.9
    assert m["true target"]["transfer"] > 0.95 and m["projector"]["transfer"] > 0.9
    logged = MlflowClient().get_run(out["run_id"]).data.metrics
    assert logged["transfer_true"] == pytest.approx(m["true target"]["transfer"])
    assert logged["transfer_projector"] == pytest.approx(m["projector"]["transfer"])
    assert {"source_mean_offdiag_cosine", "target_effective_rank", "test_p2t_class_r1"} <= set(logged)
    assert set(out["spaces"]) == {"source", "target", "projected"}


def test_wrong_label_column_is_one_line_and_leaves_nothing(labelled):
    res = CliRunner().invoke(app, ["align", labelled["source"], labelled["target"], "--label-column", "specie",
                                   "--label-manifest", labelled["labels"], "--out-dir", str(labelled["out"])])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert "'specie'" in lines[0] and "expected: class labels" in lines[0] and "species" in lines[0]
    assert not labelled["out"].exists()
    frame = pd.read_csv(labelled["labels"])
    frame.loc[0, "species"] = "fox"  # a class with no prompt, wherever its id falls in the split
    frame.to_csv(labelled["labels"], index=False)
    with pytest.raises(ManifestError, match=r"labels \['fox'\] in column 'species' have no prompt"):
        align.fn(AlignParams(source_store=labelled["source"], target_store=labelled["target"], label_column="species",
                             label_manifest=labelled["labels"], class_store=labelled["classes"], train=FAST,
                             out_dir=str(labelled["out"])))
    assert not labelled["out"].exists()


def test_a_failed_run_leaves_no_folder_and_keeps_the_latest(prefect_server, mlflow_uri, labelled):
    good = align(AlignParams(source_store=labelled["source"], target_store=labelled["target"], train=FAST, out_dir=str(labelled["out"])))
    (latest,) = labelled["out"].glob("*-latest")
    before = (latest / "source_run.txt").read_text()
    with pytest.raises(RuntimeError):  # fails inside the run, after its folder was made
        align(AlignParams(source_store=labelled["source"], target_store=labelled["target"], train=FAST | {"device": "nonexistent"},
                          out_dir=str(labelled["out"])))
    folders = sorted(p.name for p in labelled["out"].iterdir() if p.is_dir())  # (each run folder has a .lock file beside it)
    assert folders == sorted([latest.name, good["run_dir"].rsplit("/", 1)[1]])
    assert (latest / "source_run.txt").read_text() == before
