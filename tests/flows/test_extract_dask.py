"""extract_embeddings scaled out on a 2-worker Dask LocalCluster: the merged store equals the single-process one."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from encoders.store.shards import merge_shards, shard_dir, shard_ranges
from encoders.store import IDENTITY_ATTRS, EmbeddingStore, StoreError
from flows.extract import ExtractParams, extract_embeddings
from tests_support import TINY_VIT


def test_shard_ranges_are_contiguous_and_batch_aligned():
    assert shard_ranges(120, 2, align=16) == [(0, 64), (64, 120)]
    assert shard_ranges(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert shard_ranges(5, 3, align=16) == [(0, 5)]  # one batch cannot be split
    assert shard_ranges(0, 3) == [(0, 0)]
    for n, k, a in [(1000, 3, 32), (97, 5, 1), (33, 2, 16)]:
        r = shard_ranges(n, k, align=a)
        assert r[0][0] == 0 and r[-1][1] == n and all(hi > lo and lo % a == 0 for lo, hi in r)
        assert all(r[i][1] == r[i + 1][0] for i in range(len(r) - 1))
    with pytest.raises(ValueError):
        shard_ranges(10, 0)


def test_merge_refuses_an_incomplete_shard(tmp_path):
    from encoders.store import StoreWriter

    with StoreWriter(tmp_path / "a.h5", dim=4, attrs={"encoder_spec": "x"}) as w:
        w.append(["a"], np.ones((1, 4), np.float32), rows_done=1)
    with pytest.raises(StoreError, match="incomplete"):
        merge_shards([tmp_path / "a.h5"], tmp_path / "out.h5", {})
    assert not (tmp_path / "out.h5").exists()


def _attrs(path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}


@pytest.mark.timeout(150)
def test_sharded_extraction_on_dask_equals_single_process(prefect_server, mlflow_uri, tmp_path):
    rows = [(f"t{i:03d}", f"a short caption number {i} about {'cats' if i % 3 else 'dogs'}") for i in range(120)]
    rows[70] = ("t070", "")  # empty text, in shard 2
    rows[100] = ("t005", "the same id again")  # duplicate whose first occurrence (row 5) is in shard 1
    manifest = tmp_path / "texts.csv"
    manifest.write_text("id,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    spec = f"open_clip:text:{TINY_VIT}?batch_size=16"
    base = dict(manifest=str(manifest), column="caption", encoder=spec)

    single = extract_embeddings(ExtractParams(**base, out_dir=str(tmp_path / "single")))
    sharded = extract_embeddings(ExtractParams(**base, out_dir=str(tmp_path / "sharded"), shards=2))

    a, b = EmbeddingStore(single["store"]), EmbeddingStore(sharded["store"])
    assert a.path != b.path and a.path.name == b.path.name
    assert a.n == b.n == 118
    assert list(a.ids) == list(b.ids)
    assert np.array_equal(a.embeddings(), b.embeddings())
    ea, eb = a.errors(), b.errors()
    assert ea.equals(eb)
    assert list(eb["id"]) == ["t070", "t005"]
    assert eb["reason"].tolist() == ["empty caption", "duplicate id (first at row 5)"]

    # the merged store is complete and carries the single-process identity (full-manifest digest)
    aa, ab = _attrs(a.path), _attrs(b.path)
    assert ab["complete"] and ab["n"] == 118 and ab["n_errors"] == 2 and ab["rows_done"] == 120
    assert {k: ab[k] for k in IDENTITY_ATTRS} == {k: aa[k] for k in IDENTITY_ATTRS}
    assert {k: v for k, v in ab.items() if k not in ("created", "seconds", "shards")} == \
        {k: v for k, v in aa.items() if k not in ("created", "seconds")}
    with h5py.File(a.path, "r") as fa, h5py.File(b.path, "r") as fb:
        for name in ("ids", "embeddings", "errors/ids", "errors/reasons"):
            assert fa[name].chunks == fb[name].chunks and fa[name].maxshape == fb[name].maxshape

    # it took the Dask path: 2 shards, recorded on the store, the summary and the MLflow run
    assert ab["shards"] == 2 and "shards" not in aa
    assert sharded["shards"] == 2 and not shard_dir(b.path).exists()
    assert {k: sharded[k] for k in ("n", "n_errors", "dim", "dtype", "rows_total", "encoder_spec", "weights_digest")} == \
        {k: single[k] for k in ("n", "n_errors", "dim", "dtype", "rows_total", "encoder_spec", "weights_digest")}
    run = MlflowClient().get_run(sharded["run_id"])
    assert run.data.params["shards"] == "2" and run.data.params["N"] == "118"
    assert MlflowClient().get_run(single["run_id"]).data.params["shards"] == "1"
    assert any(x.path.endswith(".errors.csv") for x in MlflowClient().list_artifacts(sharded["run_id"]))

    # same inputs again: served from the Prefect cache, no cluster
    again = extract_embeddings(ExtractParams(**base, out_dir=str(tmp_path / "sharded"), shards=2))
    assert again.get("cached") and again["store"] == sharded["store"]
