"""The paired sets of ``benchmarks/semi.py``: NAME -> (x, y, ids), source and target rows aligned by id.

Sets the semi-supervised method was designed on: ``digits-random`` (the digits stand-in, two
random-feature "encoders") and Fashion-MNIST (``--fashion``). Sets it was NOT designed on (issue
23), each built offline from what the packages bundle:
  sklearn-digits-halves   scikit-learn's digits as two feature views: top half vs bottom half of the 8x8 pixels
  sklearn-cancer-views    scikit-learn's breast-cancer table: the 10 "mean" features vs the 10 "worst" ones
  stereo-rgb-depth        RGB -> disparity patches of scikit-image's Middlebury scene (data/stereo.py), both
                          under pretrained EfficientNet-Lite0
  shapes-lite0-mnv2       3,000 procedurally drawn shapes (data/shapes.py) under pretrained EfficientNet-Lite0
                          -> MobileNetV2 (the issue's failing case: two real packaged encoders, offline)
  photos-lite0-mnv2       2,000 random crops of scikit-image's bundled photos (data/photos.py), same two encoders;
                          added after the transport method was written, and not tuned on either
Stores are extracted once under ``--cache`` and reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

Set = tuple[np.ndarray, np.ndarray, list[str]]
LITE0 = "timm:image:tf_efficientnet_lite0.in1k?image_size=64&batch_size=128"
MOBILENET = "timm:image:mobilenetv2_100.deepsort_in1k?image_size=64&batch_size=128"
NOT_TUNED = ("sklearn-digits-halves", "sklearn-cancer-views", "stereo-rgb-depth", "shapes-lite0-mnv2", "photos-lite0-mnv2")


def digits_random() -> dict[str, Set]:
    """The original stand-in: two random-feature maps of the digits' pixels (migration) and of their Sobel sketch."""
    from scipy.ndimage import sobel
    from sklearn.datasets import load_digits

    img = load_digits().images / 16.0  # (N, 8, 8)
    px = img.reshape(len(img), -1)
    sk = np.hypot(sobel(img, 1), sobel(img, 2)).reshape(len(img), -1)

    def encoder(x, seed, dim, act):
        r = np.random.default_rng(seed)
        h = act(x @ (r.normal(size=(x.shape[1], dim)) / np.sqrt(x.shape[1])) + 0.1 * r.normal(size=dim))
        return (h / np.linalg.norm(h, axis=1, keepdims=True)).astype(np.float32)

    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    ids = [f"digit-{i:04d}" for i in range(len(img))]
    a = encoder(px, 1, 256, relu)
    return {"digits-random-migration": (a, encoder(px, 2, 192, np.tanh), ids),
            "digits-random-crossmodal": (a, encoder(sk, 3, 256, relu), ids)}


def sklearn_views() -> dict[str, Set]:
    from sklearn.datasets import load_breast_cancer, load_digits

    img = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8)
    ids = [f"digit-{i:04d}" for i in range(len(img))]
    cancer = load_breast_cancer().data.astype(np.float32)  # (569, 30): mean, se, worst of 10 measures
    z = (cancer - cancer.mean(0)) / cancer.std(0)
    return {"sklearn-digits-halves": (img[:, :4].reshape(-1, 32), img[:, 4:].reshape(-1, 32), ids),
            "sklearn-cancer-views": (z[:, :10], z[:, 20:], [f"cancer-{i:03d}" for i in range(len(z))])}


def _extract(manifest: Path, column: str, spec: str, path: Path) -> str:
    from encoders.extract import extract
    from encoders.factory import load_encoder
    from encoders.manifest import Manifest

    if not path.exists():
        extract(Manifest.read(manifest), column, load_encoder(spec), path)
    return str(path)


def _joined(source: str, target: str, max_rows: int | None = None) -> Set:
    from encoders.store import join_stores

    x, y = join_stores(source, target).arrays()
    ids = [str(i) for i in join_stores(source, target).ids]
    return x[:max_rows], y[:max_rows], ids[:max_rows]


def stereo(cache: Path) -> dict[str, Set]:
    from data.stereo import build_stereo

    manifest = build_stereo(cache / "data")
    rgb = _extract(manifest, "rgb", LITE0, cache / "stereo-rgb.h5")
    return {"stereo-rgb-depth": _joined(rgb, _extract(manifest, "depth", LITE0, cache / "stereo-depth.h5"))}


def shapes(cache: Path, n: int = 3000) -> dict[str, Set]:
    from data.shapes import build_shapes

    manifest = build_shapes(cache / "data" / "shapes", n)
    lite0 = _extract(manifest, "image", LITE0, cache / f"shapes{n}-lite0.h5")
    return {"shapes-lite0-mnv2": _joined(lite0, _extract(manifest, "image", MOBILENET, cache / f"shapes{n}-mnv2.h5"))}


def photos(cache: Path, n: int = 2000) -> dict[str, Set]:
    from data.photos import build_photos

    manifest = build_photos(cache / "data" / "photos", n)
    lite0 = _extract(manifest, "image", LITE0, cache / f"photos{n}-lite0.h5")
    return {"photos-lite0-mnv2": _joined(lite0, _extract(manifest, "image", MOBILENET, cache / f"photos{n}-mnv2.h5"))}


def fashion(size: int, cache: Path) -> dict[str, Set]:
    """Fashion-MNIST (the set the method was designed on): image Lite0 -> MobileNetV2, and image -> Sobel sketch."""
    from data.build import build_all

    manifest = build_all(cache / "data", fashion_size=size)["fashion"]
    image = _extract(manifest, "image", LITE0, cache / f"fashion{size}-image-lite0.h5")
    return {"fashion-migration": _joined(image, _extract(manifest, "image", MOBILENET, cache / f"fashion{size}-image-mnv2.h5")),
            "fashion-crossmodal": _joined(image, _extract(manifest, "sketch", LITE0, cache / f"fashion{size}-sketch-lite0.h5"))}
