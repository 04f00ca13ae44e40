"""Offline, deterministic builder for the xmodal example data sets.

Usage::

    python -m data.build [--out data/generated] [--scenes 600] [--fashion 3000] [--seed 0] [--force]

or from Python::

    from data.build import build_all
    manifests = build_all(Path("data/generated"))   # -> {"fashion": ..., "fashion_classes": ..., "stereo": ..., "digits": ...}

The real sets: Fashion-MNIST from the Debian package (``data/fashion_mnist.py``; fetched without
root when missing, else the digits stand in) and RGB/disparity patches of a real Middlebury stereo
scene bundled with scikit-image (``data/stereo.py``). The small sets: the digits come from
scikit-learn's *bundled* copy of the UCI handwritten digits (``sklearn.datasets.load_digits``), and
the synthetic scenes (kept for fast tests: exact depth, known objects) from a seeded numpy RNG.
Nothing is downloaded at run time except the Debian package by apt.  Every PNG is written by PIL with no metadata chunks, so two
builds with the same parameters are identical byte for byte.

Output layout (all paths in the manifests are relative to the manifest's folder)::

    <out>/
      build.json                  stamp: parameters + digest; a matching stamp skips the rebuild
      fashion/, stereo/           see data/fashion_mnist.py and data/stereo.py
      digits/
        manifest.csv              id, image, sketch, caption, label          (1,797 rows)
        classes.csv               id, caption, label                         (10 rows, class-0..class-9)
        images/digit-0000.png     32x32 RGB, WHITE digit on BLACK (ink = bright), nearest upscale x4
        sketches/digit-0000.png   32x32 RGB, Sobel edge magnitude of the upscaled image,
                                  per-image normalised to 0..255 (edges bright on black)
      scenes/
        manifest.csv              id, rgb, depth, n_objects, n_rects, n_discs, mean_depth,
                                  min_depth, object_coverage, nearest_object_depth
        rgb/scene-0000.png        32x32 RGB render (farther = darker, small Gaussian noise)
        depth/scene-0000.png      32x32 depth as gray RGB (near = bright), see ``depth_to_gray``

Scenes: the whole frame is a ground plane whose depth falls linearly from ``GROUND_FAR``
(top row) to ``GROUND_NEAR`` (bottom row).  Each scene adds 1-4 objects (axis-aligned
rectangles or discs) with random position, size, colour and depth.  An object's depth is
drawn strictly nearer than the ground at its lowest covered row (minus ``DEPTH_MARGIN``),
so every object pixel is nearer (brighter in the depth PNG) than the ground behind it, and
objects are painted far-to-near, giving the same occlusion in RGB and depth.  Scene ``i``
uses ``numpy.random.default_rng([seed, i])``, so scene content does not depend on
``n_scenes`` (a 40-scene build is a prefix of a 600-scene build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data import fashion_mnist
from data.common import save_png, sobel_sketch, write_csv
from data.stereo import build_stereo

BUILDER_VERSION = 1
IMAGE_SIZE = 32
DIGIT_UPSCALE = IMAGE_SIZE // 8  # 8x8 -> 32x32

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATE = "a handwritten digit {word}"

# Scene depth range (metres).  Gray = 255 * (DEPTH_MAX - d) / (DEPTH_MAX - DEPTH_MIN).
DEPTH_MIN = 1.0
DEPTH_MAX = 10.0
GROUND_FAR = 10.0   # ground depth at the top row
GROUND_NEAR = 2.0   # ground depth at the bottom row
DEPTH_MARGIN = 0.3  # objects are at least this much nearer than the ground they cover
GROUND_COLOUR = np.array([110.0, 140.0, 90.0])  # mossy green-grey
RGB_NOISE_STD = 3.0

DEFAULT_OUT = Path(__file__).resolve().parent / "generated"


def caption_for(label: int) -> str:
    return CAPTION_TEMPLATE.format(word=NUMBER_WORDS[int(label)])


# --------------------------------------------------------------------------- digits


def upscale_digit(digit: np.ndarray) -> np.ndarray:
    """8x8 digit (0..16, ink high) -> 32x32 uint8 gray, white ink on black, nearest-neighbour."""
    gray = np.rint(np.asarray(digit, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return np.repeat(np.repeat(gray, DIGIT_UPSCALE, axis=0), DIGIT_UPSCALE, axis=1)


def _build_digits(out: Path) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    ds = load_digits()
    images, labels = ds.images, ds.target.astype(int)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "sketches").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (digit, label) in enumerate(zip(images, labels)):
        did = f"digit-{i:04d}"
        up = upscale_digit(digit)
        img_rel, sk_rel = f"images/{did}.png", f"sketches/{did}.png"
        save_png(up, out / img_rel)
        save_png(sobel_sketch(up), out / sk_rel)
        rows.append({"id": did, "image": img_rel, "sketch": sk_rel, "caption": caption_for(label), "label": int(label)})
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(rows, columns=["id", "image", "sketch", "caption", "label"]), manifest)
    classes = out / "classes.csv"
    write_csv(
        pd.DataFrame(
            [{"id": f"class-{k}", "caption": caption_for(k), "label": k} for k in range(10)],
            columns=["id", "caption", "label"],
        ),
        classes,
    )
    return manifest, classes


# --------------------------------------------------------------------------- scenes


def ground_depth(size: int = IMAGE_SIZE) -> np.ndarray:
    """Per-row ground depth (metres), shape (size,): far at the top, near at the bottom."""
    return np.linspace(GROUND_FAR, GROUND_NEAR, size)


def depth_to_gray(depth: np.ndarray) -> np.ndarray:
    """Depth in metres -> uint8 gray, near = bright (DEPTH_MIN -> 255, DEPTH_MAX -> 0)."""
    d = np.asarray(depth, dtype=np.float64)
    return np.rint((DEPTH_MAX - d) * (255.0 / (DEPTH_MAX - DEPTH_MIN))).clip(0, 255).astype(np.uint8)


def _shade(depth: np.ndarray) -> np.ndarray:
    """Brightness factor: 1.0 at DEPTH_MIN down to 0.3 at DEPTH_MAX (farther = darker)."""
    return 1.0 - 0.7 * (np.asarray(depth) - DEPTH_MIN) / (DEPTH_MAX - DEPTH_MIN)


@dataclass
class Scene:
    rgb: np.ndarray            # (H, W, 3) uint8
    depth: np.ndarray          # (H, W) float64 metres
    depth_png: np.ndarray      # (H, W) uint8 gray as written
    object_mask: np.ndarray    # (H, W) bool, visible object pixels
    objects: list[dict] = field(default_factory=list)  # painted far-to-near


def render_scene(seed: int, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Render scene ``index`` for ``seed`` deterministically (independent of the scene count)."""
    rng = np.random.default_rng([int(seed), int(index)])
    yy, xx = np.mgrid[0:size, 0:size]
    ground = ground_depth(size)
    depth = np.repeat(ground[:, None], size, axis=1).astype(np.float64)
    colour = np.broadcast_to(GROUND_COLOUR, (size, size, 3)).copy()
    mask = np.zeros((size, size), dtype=bool)

    objects = []
    for _ in range(int(rng.integers(1, 5))):
        kind = "rect" if rng.random() < 0.5 else "disc"
        if kind == "rect":
            h, w = (int(v) for v in rng.integers(4, size // 2 + 1, size=2))
            y0, x0 = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            shape = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            geom = {"y0": y0, "x0": x0, "h": h, "w": w}
        else:
            r = float(rng.uniform(2.5, size / 4))
            cy, cx = float(rng.uniform(0, size - 1)), float(rng.uniform(0, size - 1))
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            geom = {"cy": cy, "cx": cx, "r": r}
        if not shape.any():  # cannot happen with these ranges; keep the invariant explicit
            continue
        y_bottom = int(yy[shape].max())
        d_hi = ground[y_bottom] - DEPTH_MARGIN  # strictly nearer than the ground it covers
        d = float(rng.uniform(DEPTH_MIN, d_hi))
        rgb_col = rng.integers(30, 256, size=3).astype(np.float64)
        objects.append({"kind": kind, "depth": d, "colour": rgb_col, "shape": shape, **geom})

    objects.sort(key=lambda o: -o["depth"])  # painter's algorithm: far first
    for o in objects:
        s = o["shape"]
        depth[s] = o["depth"]
        colour[s] = o["colour"]
        mask |= s

    rgb = colour * _shade(depth)[:, :, None] + rng.normal(0.0, RGB_NOISE_STD, size=(size, size, 3))
    rgb = np.rint(rgb).clip(0, 255).astype(np.uint8)
    for o in objects:
        o.pop("shape")
        o["colour"] = [int(c) for c in o["colour"]]
    return Scene(rgb=rgb, depth=depth, depth_png=depth_to_gray(depth), object_mask=mask, objects=objects)


def _build_scenes(out: Path, n_scenes: int, seed: int) -> Path:
    (out / "rgb").mkdir(parents=True, exist_ok=True)
    (out / "depth").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_scenes):
        sid = f"scene-{i:04d}"
        sc = render_scene(seed, i)
        rgb_rel, depth_rel = f"rgb/{sid}.png", f"depth/{sid}.png"
        save_png(sc.rgb, out / rgb_rel)
        save_png(sc.depth_png, out / depth_rel)
        visible_obj_depth = sc.depth[sc.object_mask]
        rows.append(
            {
                "id": sid,
                "rgb": rgb_rel,
                "depth": depth_rel,
                "n_objects": len(sc.objects),
                "n_rects": sum(o["kind"] == "rect" for o in sc.objects),
                "n_discs": sum(o["kind"] == "disc" for o in sc.objects),
                "mean_depth": float(sc.depth.mean()),
                "min_depth": float(sc.depth.min()),
                "object_coverage": float(sc.object_mask.mean()),
                "nearest_object_depth": float(visible_obj_depth.min()),
            }
        )
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(rows), manifest)
    return manifest


# --------------------------------------------------------------------------- orchestration


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(n_scenes: int, seed: int, fashion_size: int, fashion: bool) -> dict:
    return {
        "builder_version": BUILDER_VERSION,
        # any edit to a builder forces a rebuild
        "builder_sha256": {f.name: _sha256(f) for f in sorted(Path(__file__).parent.glob("*.py"))},
        "image_size": IMAGE_SIZE,
        "n_scenes": int(n_scenes),
        "seed": int(seed),
        "fashion_size": int(fashion_size) if fashion else None,  # None: Fashion-MNIST unavailable, digits stand in
    }


def _manifest_paths(out: Path, fashion: bool) -> dict[str, Path]:
    paths = {
        "digits": out / "digits" / "manifest.csv",
        "digit_classes": out / "digits" / "classes.csv",
        "scenes": out / "scenes" / "manifest.csv",
        "stereo": out / "stereo" / "manifest.csv",
    }
    if fashion:
        paths |= {"fashion": out / "fashion" / "manifest.csv", "fashion_classes": out / "fashion" / "classes.csv"}
    return paths


def _with_fallback(paths: dict[str, Path]) -> dict[str, Path]:
    """Without Fashion-MNIST its keys name the digits, so callers run on whichever set exists."""
    return {"fashion": paths["digits"], "fashion_classes": paths["digit_classes"]} | paths


def _digest(paths: dict[str, Path]) -> str:
    """Digest of the manifests (they name every file; file counts are checked separately)."""
    h = hashlib.sha256()
    for key in sorted(paths):
        h.update(key.encode() + b"\0" + paths[key].read_bytes() + b"\0")
    return h.hexdigest()


def _is_up_to_date(out: Path, params: dict, paths: dict[str, Path]) -> bool:
    stamp = out / "build.json"
    if not stamp.is_file() or not all(p.is_file() for p in paths.values()):
        return False
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params") != params or meta.get("digest") != _digest(paths):
        return False
    counts = meta.get("file_counts", {})
    return all(len(list((out / sub).glob("*.png"))) == counts.get(sub, -1) for sub in _PNG_DIRS)


_PNG_DIRS = ("digits/images", "digits/sketches", "scenes/rgb", "scenes/depth", "fashion/images", "fashion/sketches",
             "stereo/rgb", "stereo/depth", "stereo/disparity")


def build_all(out_dir: Path = DEFAULT_OUT, n_scenes: int = 600, seed: int = 0, force: bool = False,
              fashion_size: int = 3000, say=print) -> dict[str, Path]:
    """Build every sample set under ``out_dir``; return their manifest paths by name: ``digits``,
    ``digit_classes``, ``scenes``, ``stereo``, ``fashion``, ``fashion_classes`` (the last two name
    the digits when Fashion-MNIST cannot be had, said in one line).

    Skips the work when ``out_dir/build.json`` records the same parameters (including the
    builders' own hashes) and the manifests still match its digest; ``force=True`` rebuilds.
    ``fashion_size``: balanced Fashion-MNIST rows (0 = all 70,000).
    """
    if n_scenes < 1:
        raise ValueError("n_scenes must be >= 1")
    out = Path(out_dir)
    folder = fashion_mnist.locate_idx(fetch=False)  # installed or already unpacked: no network
    params, paths = _params(n_scenes, seed, fashion_size, folder is not None), _manifest_paths(out, folder is not None)
    if not force and _is_up_to_date(out, params, paths):
        return _with_fallback(paths)
    if folder is None:
        folder = fashion_mnist.locate_idx(fetch=True, say=say)
        params, paths = _params(n_scenes, seed, fashion_size, folder is not None), _manifest_paths(out, folder is not None)

    out.mkdir(parents=True, exist_ok=True)
    (out / "build.json").unlink(missing_ok=True)  # invalid until the build completes
    for sub in ("digits", "scenes", "stereo", "fashion"):
        shutil.rmtree(out / sub, ignore_errors=True)  # drop stale files from other parameters
    _build_digits(out / "digits")
    _build_scenes(out / "scenes", n_scenes, seed)
    build_stereo(out / "stereo", seed)
    if folder is not None:
        fashion_mnist.build_fashion(out / "fashion", folder, fashion_size)

    meta = {
        "params": params,
        "digest": _digest(paths),
        "file_counts": {sub: len(list((out / sub).glob("*.png"))) for sub in _PNG_DIRS},
    }
    (out / "build.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return _with_fallback(paths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.build", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: data/generated)")
    ap.add_argument("--scenes", type=int, default=600, help="number of RGB/depth scenes (default 600)")
    ap.add_argument("--seed", type=int, default=0, help="scene RNG seed (default 0)")
    ap.add_argument("--fashion", type=int, default=3000, help="balanced Fashion-MNIST rows, 0 = all 70k (default 3000)")
    ap.add_argument("--force", action="store_true", help="rebuild even if build.json matches")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    paths = build_all(args.out, n_scenes=args.scenes, seed=args.seed, force=args.force, fashion_size=args.fashion)
    for key, p in paths.items():
        print(f"{key}: {p}")
    print(f"done in {time.perf_counter() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
