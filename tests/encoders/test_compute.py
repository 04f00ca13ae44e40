"""Batches encoded as parallel one-thread slices: same store as torch's own threading, threads put back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from encoders.compute import BatchEncoder, plan_workers
from encoders.extract import ExtractionError, extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.store import EmbeddingStore

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("device, batch, threads, requested, expected", [
    (CPU, 32, 2, None, (2, 1)),   # auto: one worker per thread
    (CPU, 32, 8, None, (4, 2)),   # auto: slices keep >= 8 items, spare threads go to each worker
    (CPU, 8, 2, None, (1, 2)),    # too small to slice: torch's own threading
    (CPU, 32, 2, 1, (1, 2)),      # asked for torch's own threading
    (CPU, 4, 2, 3, (3, 1)),       # explicit is honoured
    (CPU, 2, 4, 3, (2, 2)),       # ... up to the batch size
    (CUDA, 64, 8, None, (1, 8)),  # the device is the parallel part
    (CUDA, 64, 8, 4, (1, 8)),
])
def test_plan_workers(device, batch, threads, requested, expected):
    assert plan_workers(device, batch, threads, requested) == expected


def test_plan_workers_refuses_zero():
    with pytest.raises(ValueError, match="cpu_workers must be >= 1"):
        plan_workers(CPU, 32, 2, 0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _stores(tmp_path, manifest, column, encoder, workers_list, **kw):
    out = {}
    for w in workers_list:
        s = extract(Manifest.read(manifest), column, encoder, tmp_path / f"w{w}.h5", cpu_workers=w, **kw)
        assert torch.get_num_threads() == 2  # put back after every extraction
        out[w] = (s, EmbeddingStore(tmp_path / f"w{w}.h5"))
    return out


def test_sliced_image_batches_give_the_single_pass_store(tmp_path, write_images, tiny_clip_files, two_threads):
    paths = write_images(tmp_path / "imgs", 27)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"i{k:02d}" for k in range(27)], "image": paths}).to_csv(m, index=False)
    enc = load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=10")
    stores = _stores(tmp_path, m, "image", enc, [1, 2, 3])
    (_, ref) = stores[1]
    for w, (s, st) in stores.items():
        assert s.cpu_workers == w and s.n == 27
        assert list(st.ids) == list(ref.ids)
        np.testing.assert_allclose(st.embeddings(), ref.embeddings(), atol=1e-6)


def test_sliced_text_batches_pad_per_slice_and_match(tmp_path, tiny_bert_dir, two_threads):
    # Slices pad to their own longest text; mean pooling over the attention mask must not notice.
    texts = ["a cat", "the handwritten digit seven", "a dog photo of a cat of a dog", "one", "two three four five six",
             "photo", "a the a the a the a the", "nine eight"] * 3
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"t{k:02d}" for k in range(len(texts))], "text": texts}).to_csv(m, index=False)
    enc = load_encoder(f"hf:text:{tiny_bert_dir}?pooling=mean&batch_size=8")
    stores = _stores(tmp_path, m, "text", enc, [1, 2, 4])
    ref = stores[1][1].embeddings()
    for w, (s, st) in stores.items():
        np.testing.assert_allclose(st.embeddings(), ref, atol=1e-5, err_msg=f"cpu_workers={w}")


def test_threads_are_put_back_when_extraction_fails(tmp_path, write_images, tiny_clip_files, two_threads):
    paths = write_images(tmp_path / "imgs", 6)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": list("abcdefg"), "image": paths[:5] + ["imgs/missing.png", paths[5]]}).to_csv(m, index=False)
    enc = load_encoder(f"open_clip:image:{tiny_clip_files['json']}?batch_size=4")
    with pytest.raises(ExtractionError, match="id 'f'.*missing file"):
        extract(Manifest.read(m), "image", enc, tmp_path / "s.h5", on_error="fail", cpu_workers=2)
    assert torch.get_num_threads() == 2
    assert list(EmbeddingStore(tmp_path / "s.h5", allow_incomplete=True).ids) == list("abcd")  # first batch kept
    with BatchEncoder(enc, 16, 2) as encode:
        assert torch.get_num_threads() == 1 and encode.workers == 2
        assert encode([]).shape == (0, enc.dim)
    assert torch.get_num_threads() == 2


def test_overlapping_extractions_in_one_process_leave_the_thread_count_as_found(tmp_path, write_images, tiny_clip_files,
                                                                                two_threads):
    import threading

    paths = write_images(tmp_path / "imgs", 40)
    m = tmp_path / "manifest.csv"
    pd.DataFrame({"id": [f"i{k:02d}" for k in range(40)], "image": paths}).to_csv(m, index=False)
    enc = load_encoder(f"open_clip:image:{tiny_clip_files['json']}@{tiny_clip_files['safetensors']}?batch_size=16")
    started, results = threading.Barrier(2), {}

    def run(name):
        started.wait()
        results[name] = extract(Manifest.read(m), "image", enc, tmp_path / f"{name}.h5", cpu_workers=2)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == 2
    assert results["a"].n == results["b"].n == 40
    np.testing.assert_allclose(EmbeddingStore(tmp_path / "a.h5").embeddings(), EmbeddingStore(tmp_path / "b.h5").embeddings(),
                               atol=1e-6)
