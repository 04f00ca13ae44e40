"""The search service and its HTTP API (FastAPI's TestClient: real app, real encoders, real stores).

Tiny random-init encoders keep it fast; the answers are checked against a brute-force search of
the same vectors, and an uploaded gallery image must find itself first.
"""

from __future__ import annotations

import base64

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from encoders.extract import extract
from encoders.factory import load_encoder
from encoders.manifest import Manifest
from encoders.store import EmbeddingStore
from projection.align.config import ProjectorConfig
from projection.align.projector import load_projector, make_projector, save_projector
from projection.search.app import create_app
from projection.search.index import build_for_store, unit_rows
from projection.search.service import load_service
from tests_support import TINY_VIT

IMAGE_SPEC = f"open_clip:image:{TINY_VIT}?seed=3"
TEXT_SPEC = f"open_clip:text:{TINY_VIT}?seed=3"
N = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    for i in range(N):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "img" / f"p{i:03d}.png")
    pd.DataFrame({"id": [f"p{i:03d}" for i in range(N)], "image": [f"img/p{i:03d}.png" for i in range(N)]}).to_csv(
        root / "manifest.csv", index=False)
    enc = load_encoder(IMAGE_SPEC)
    store = root / "gallery.h5"
    extract(Manifest.read(root / "manifest.csv"), "image", enc, store)
    d_img, d_txt = enc.dim, load_encoder(TEXT_SPEC).dim
    sketch = save_projector(make_projector(ProjectorConfig(kind="linear", d_in=d_img, d_out=d_img), 1), root / "sketch")
    text = save_projector(make_projector(ProjectorConfig(kind="linear", d_in=d_img, d_out=d_txt), 2), root / "text")
    service = load_service(store, sketch_projector=sketch, text_projector=text, text_encoder=TEXT_SPEC)
    return {"root": root, "store": str(store), "service": service, "client": TestClient(create_app(service)),
            "sketch": sketch, "text": text}


def _brute(q: np.ndarray, rows: np.ndarray, k: int) -> list[int]:
    s = unit_rows(rows) @ (q / np.linalg.norm(q))
    return np.argsort(-s, kind="stable")[:k].tolist()


def _proj(directory, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return load_projector(directory).eval()(torch.from_numpy(x)).numpy()


def test_page_and_info(setup):
    c = setup["client"]
    page = c.get("/")
    assert page.status_code == 200 and 'id="pad"' in page.text and "/api/search" in page.text
    info = c.get("/api/info").json()
    assert info["rows"] == N and info["files"] == N and set(info["modes"]) == {"image", "sketch", "text"}
    assert info["spaces"]["caption"]["method"] == "exact"


def test_an_uploaded_gallery_image_finds_itself_and_links_its_file(setup):
    c, root = setup["client"], setup["root"]
    data = (root / "img" / "p007.png").read_bytes()
    out = c.post("/api/search", data={"mode": "image", "k": "5"}, files={"file": ("q.png", data, "image/png")}).json()
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    top = out["results"][0]
    assert top["id"] == "p007" and top["score"] > 0.999 and top["url"] == "/files/7"
    assert c.get(top["url"]).content == data  # the thumbnail is the gallery's own file
    assert c.get("/files/999").status_code == 404
    # the same query as JSON (base64, or a data: URL as the canvas gives) answers the same
    js = c.post("/api/search", json={"mode": "image", "k": 5, "image": "data:image/png;base64," + base64.b64encode(data).decode()})
    assert [r["id"] for r in js.json()["results"]] == [r["id"] for r in out["results"]]


def test_sketch_and_text_routes_rank_as_brute_force_does(setup):
    c, root, svc = setup["client"], setup["root"], setup["service"]
    gallery = EmbeddingStore(setup["store"]).embeddings()
    q_path = root / "img" / "p011.png"
    q = load_encoder(IMAGE_SPEC).encode_items([str(q_path)]).numpy()
    want = _brute(_proj(setup["sketch"], q)[0], gallery, 8)
    got = c.post("/api/search", data={"mode": "sketch", "k": "8"}, files={"file": ("s.png", q_path.read_bytes())}).json()
    assert [r["row"] for r in got["results"]] == want
    # text: the query is the text embedding; the gallery was projected into caption space once, at load
    t = svc.routes["text"].encoder.embed("a red square")
    want = _brute(t, _proj(setup["text"], gallery), 8)
    got = c.post("/api/search", json={"mode": "text", "text": "a red square", "k": 8}).json()
    assert [r["row"] for r in got["results"]] == want and got["space"] == "caption"


@pytest.mark.parametrize("kwargs, message", [
    ({"data": {"mode": "image"}, "files": {"file": ("x.png", b"not an image")}}, "the upload is not a readable image"),
    ({"json": {"mode": "text", "text": "  "}}, "empty text query"),
    ({"json": {"mode": "video", "text": "x"}}, "mode must be one of image, sketch, text"),
    ({"json": {"mode": "text", "text": "x", "k": 0}}, "k must be between 1 and 1000"),
    ({"json": {"mode": "sketch", "image": "%%%"}}, '"image" is not valid base64'),
    ({"content": b"x", "headers": {"content-type": "text/plain"}}, "send multipart/form-data or application/json"),
])
def test_bad_requests_get_one_clear_line(setup, kwargs, message):
    r = setup["client"].post("/api/search", **kwargs)
    assert r.status_code == 400 and r.json()["error"].startswith(message) and "\n" not in r.json()["error"]


def test_a_large_gallery_is_searched_through_its_saved_index(setup, tmp_path):
    import shutil

    store = tmp_path / "gallery.h5"
    shutil.copy(setup["store"], store)
    build_for_store(store, flat_below=10)
    svc = load_service(store, ann_min_rows=10)  # as if 40 rows were many
    assert svc.info()["spaces"]["native"]["method"].startswith("faiss IVF")
    data = (setup["root"] / "img" / "p021.png").read_bytes()
    assert svc.query("image", image=data, k=3)["results"][0]["id"] == "p021"
    with pytest.raises(ValueError, match="mode 'text' is not served"):
        svc.query("text", text="shoes")
