"""Fashion-MNIST (real, 70k 28x28 grey photos of clothes in 10 classes) as a paired xmodal set.

Source: the Debian package ``dataset-fashion-mnist`` (MIT), IDX gz files under
``/usr/share/datasets/fashion-mnist/``. Where it is not installed, the builder fetches it itself
without root: ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` into
``<XMODAL_CACHE or ~/.cache/xmodal>/debian/`` (an ``apt-get update`` first when the package lists
are empty: that one needs root, as on CI). Without apt, ``locate_idx`` says so in one line and
returns None, and the caller falls back to the digits.

Output (paths relative to the manifest)::

    fashion/
      manifest.csv    id, image, sketch, caption, label, class_name, source_split
      classes.csv     id, caption, label, class_name                  (10 rows: class prompts)
      images/*.png    28x28 RGB (grey repeated), bright garment on black, as in the IDX files
      sketches/*.png  Sobel edge magnitude of the image, normalised per image to 0..255

``size`` rows, balanced: the first size/10 items of each class in (train, then test) file order,
so a 3000-row build is a prefix-by-class of a 6000-row one; ``size=0`` takes all 70,000.
Ids name the source file and index (``fmnist-train-00017``), so they are stable across sizes.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from data.common import save_png, sobel_sketch, write_csv

PACKAGE = "dataset-fashion-mnist"
INSTALLED = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Fashion-MNIST's own class names (label 0..9); captions use the lower-case short form.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CAPTION_NAMES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")


def caption_for(label: int) -> str:
    name = CAPTION_NAMES[int(label)]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _cache() -> Path:
    return Path(os.environ.get("XMODAL_CACHE") or Path.home() / ".cache" / "xmodal") / "debian"


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for pair in FILES.values() for f in pair)


def locate_idx(fetch: bool = True, say=print) -> Path | None:
    """Folder holding the four IDX gz files: the installed package, our cache, or a fresh
    ``apt-get download`` + ``dpkg-deb -x`` (no root). None, with one line said, when impossible."""
    cached = _cache() / PACKAGE / "usr/share/datasets/fashion-mnist"
    for folder in (INSTALLED, cached):
        if _has_files(folder):
            return folder
    if not fetch:
        return None
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        say(f"Fashion-MNIST: no apt-get/dpkg-deb on this machine to fetch the Debian package {PACKAGE}; "
            "falling back to the digits")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        deb = _download(Path(tmp), say)
        if deb is None:
            return None
        cached.parents[3].mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cached.parents[3])], check=True, capture_output=True)
    return cached if _has_files(cached) else None


def _download(tmp: Path, say) -> Path | None:
    def attempt() -> Path | None:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        return next(tmp.glob(f"{PACKAGE}_*.deb"), None)

    deb = attempt()
    if deb is None:  # empty package lists on a fresh machine: refresh them (needs root), try once more
        update = subprocess.run(["apt-get", "update"], capture_output=True, text=True)
        deb = attempt() if update.returncode == 0 else None
        if deb is None:
            why = "apt-get update failed (not root?)" if update.returncode else "apt has no such package"
            say(f"Fashion-MNIST: could not fetch the Debian package {PACKAGE} ({why}); falling back to the digits")
    return deb


def read_idx(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int labels of one part ('train' | 'test')."""
    images_gz, labels_gz = FILES[part]
    with gzip.open(folder / images_gz) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / labels_gz) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(int)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in {part}")
    return images, labels


def select(labels_by_part: dict[str, np.ndarray], size: int) -> list[tuple[str, int]]:
    """(part, index) of the balanced selection, in (class, part, index) order; size 0 = everything."""
    per_class = size // 10 if size else None
    chosen = []
    for k in range(10):
        rows = [(part, int(i)) for part, labels in labels_by_part.items() for i in np.flatnonzero(labels == k)]
        chosen += rows[:per_class]
    return chosen


def build_fashion(out: Path, folder: Path, size: int) -> tuple[Path, Path]:
    """Write images, sketches, manifest.csv and classes.csv under ``out``; return both manifests."""
    if size < 0 or (size and size < 10):
        raise ValueError(f"fashion size must be 0 (all) or >= 10, got {size}")
    data = {part: read_idx(folder, part) for part in FILES}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "sketches").mkdir(parents=True, exist_ok=True)
    rows = []
    for part, i in select({p: d[1] for p, d in data.items()}, size):
        image, label = data[part][0][i], int(data[part][1][i])
        fid = f"fmnist-{part}-{i:05d}"
        img_rel, sk_rel = f"images/{fid}.png", f"sketches/{fid}.png"
        save_png(image, out / img_rel)
        save_png(sobel_sketch(image), out / sk_rel)
        rows.append({"id": fid, "image": img_rel, "sketch": sk_rel, "caption": caption_for(label), "label": label,
                     "class_name": CLASS_NAMES[label], "source_split": part})
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(rows), manifest)
    classes = out / "classes.csv"
    write_csv(pd.DataFrame([{"id": f"class-{k}", "caption": caption_for(k), "label": k, "class_name": CLASS_NAMES[k]}
                            for k in range(10)]), classes)
    return manifest, classes
