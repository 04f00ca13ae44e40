"""Fast paths give the fp32 single-process answers: bf16/fp16 cast once, decode worker processes, kill -9."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.loader import plan_decode_workers
from encoders.manifest import Manifest
from encoders.store import EmbeddingStore, StoreError
from tests_support import ROOT, kill_9_after_first_checkpoint, spawn_python

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _manifest(tmp_path, write_images, n: int):
    paths = write_images(tmp_path / "imgs", n)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"i{k:03d}" for k in range(n)], "image": paths}).to_csv(m, index=False)
    return m


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_store_is_within_cosine_0999_of_fp32_and_says_so(tmp_path, write_images, tiny_clip_files, dtype):
    m = _manifest(tmp_path, write_images, 24)
    base = f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=8"
    ref = extract(Manifest.read(m), "image", load_encoder(base), tmp_path / "fp32.h5")
    enc = load_encoder(f"{base}&dtype={dtype}")
    low = extract(Manifest.read(m), "image", enc, tmp_path / f"{dtype}.h5")
    a, b = EmbeddingStore(ref.store), EmbeddingStore(low.store)
    assert list(a.ids) == list(b.ids) and b.attrs["compute_dtype"] == low.compute_dtype == dtype
    assert a.attrs["compute_dtype"] == "fp32" and b.attrs["dtype"] == "float32"  # compute dtype, not storage dtype
    assert _min_cosine(a.embeddings(), b.embeddings()) >= 0.999
    assert not np.array_equal(a.embeddings(), b.embeddings())  # it really computed in low precision
    low_t = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    params = dict(enc.module.named_parameters())
    assert params["visual.conv1.weight"].dtype == low_t  # weights cast once ...
    assert params["visual.ln_post.weight"].dtype == torch.float32  # ... norms kept in fp32
    assert enc.digest == load_encoder(base).digest  # same weights, whatever they compute in


def test_bf16_text_mean_pooling_matches_fp32(tmp_path, tiny_bert_dir):
    texts = ["a cat", "the handwritten digit seven", "a dog photo of a cat of a dog", "one", "two three four five six"]
    ref = load_encoder(f"hf:text:{tiny_bert_dir}?pooling=mean").encode_items(texts).numpy()
    low = load_encoder(f"hf:text:{tiny_bert_dir}?pooling=mean&dtype=bf16").encode_items(texts)
    assert low.dtype == torch.float32 and _min_cosine(ref, low.numpy()) >= 0.999


def test_a_store_of_one_compute_dtype_is_not_continued_in_another(tmp_path, write_images, tiny_clip_files):
    m = _manifest(tmp_path, write_images, 8)
    base = f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=8"
    extract(Manifest.read(m), "image", load_encoder(base), tmp_path / "s.h5")
    with pytest.raises(StoreError, match="differs in encoder_spec, compute_dtype"):
        extract(Manifest.read(m), "image", load_encoder(f"{base}&dtype=bf16"), tmp_path / "s.h5")


@pytest.mark.parametrize("device, modality, requested, cores, expected", [
    (CPU, "image", None, 2, 0),     # this machine: one helper thread, the model keeps both cores
    (CPU, "image", None, 16, 2),    # one decode process per 8 cores
    (CUDA, "image", None, 16, 15),  # a GPU: every core but the one feeding it
    (CUDA, "image", None, 64, 32),  # ... capped
    (CUDA, "text", None, 16, 0),    # tokenising needs no process
    (CPU, "image", 3, 2, 3),        # explicit is honoured
])
def test_plan_decode_workers(device, modality, requested, cores, expected):
    assert plan_decode_workers(device, modality, requested, cores) == expected


def test_decode_worker_processes_give_the_in_process_store_and_error_rows(tmp_path, write_images, tiny_clip_files):
    paths = write_images(tmp_path / "imgs", 21)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"i{k:02d}" for k in range(23)],
                  "image": paths[:7] + ["imgs/bad.png"] + paths[7:14] + ["imgs/missing.png"] + paths[14:]}).to_csv(m, index=False)
    enc = load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=4")
    stores = {w: extract(Manifest.read(m), "image", enc, tmp_path / f"w{w}.h5", decode_workers=w) for w in (0, 2)}
    assert stores[2].decode_workers == 2 and stores[0].decode_workers == 0
    a, b = EmbeddingStore(stores[0].store), EmbeddingStore(stores[2].store)
    assert list(a.ids) == list(b.ids) and len(a) == 21
    np.testing.assert_array_equal(a.embeddings(), b.embeddings())
    assert stores[2].errors == stores[0].errors and [i for i, _ in stores[2].errors] == ["i07", "i15"]


@pytest.mark.timeout(300)
def test_kill_9_during_multi_worker_extraction_then_rerun_gives_identical_store(tmp_path, write_images, tiny_clip_files):
    m = _manifest(tmp_path, write_images, 48)
    spec = f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=4"
    ref = extract(Manifest.read(m), "image", load_encoder(spec), tmp_path / "ref.h5", decode_workers=0)
    store, marker = tmp_path / "killed.h5", tmp_path / "two-batches-done"
    worker = ROOT / "tests" / "encoders" / "extract_worker.py"
    victim = spawn_python(worker, m, spec, store, marker, 2, 0.3)
    kill_9_after_first_checkpoint(victim, marker)
    part = EmbeddingStore(store, allow_incomplete=True)
    assert not part.attrs["complete"] and 8 <= part.attrs["rows_done"] < 48
    rerun = spawn_python(worker, m, spec, store, tmp_path / "unused", 2, 0)  # at once: the orphaned workers hold no lock
    assert rerun.wait(timeout=240) == 0, rerun.stdout.read()
    a, b = EmbeddingStore(ref.store), EmbeddingStore(store)
    assert list(a.ids) == list(b.ids) and len(b) == 48
    np.testing.assert_array_equal(a.embeddings(), b.embeddings())


def test_bf16_resnet_keeps_batchnorm_in_fp32_and_matches(tmp_path, write_images):
    from tests_support import TINY_RN

    m = _manifest(tmp_path, write_images, 12)
    embs = {}
    for dtype in ("fp32", "bf16"):
        enc = load_encoder(f"open_clip:image:{TINY_RN}?batch_size=6&dtype={dtype}")
        embs[dtype] = EmbeddingStore(extract(Manifest.read(m), "image", enc, tmp_path / f"{dtype}.h5").store).embeddings()
    bns = [mod for mod in enc.module.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert bns and all(b.weight.dtype == b.running_var.dtype == torch.float32 for b in bns)
    assert _min_cosine(embs["fp32"], embs["bf16"]) >= 0.999
