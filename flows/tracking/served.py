"""A stage-1 projector as an MLflow pyfunc model with no pickle in it: raw inputs in, target-space embeddings out.

``mlflow.pytorch.log_model`` pickles the module (``model.pth``), and loading it runs whatever the pickle says;
a ``PythonModel`` instance logged the usual way is a cloudpickle too. Here the model is MLflow's
"models from code": the code is ``flows/tracking/served_model.py`` (a plain file MLflow copies and imports), and the
artifacts are the project's own projector files (safetensors + JSON) plus ``xmodal.json``, which names the
source and target encoders (spec, weights digest, dim, modality) the projector was trained between.

``predict`` takes either embeddings in the source space ((N, D_src) floats: the projector alone) or raw inputs
(image paths or texts: the source encoder, then the projector). Raw inputs of the wrong modality are refused, and
so is a source encoder whose weights no longer hash to the digest the projector was trained on: both errors name
the two sides. The encoder is loaded on the first raw input, so projecting stored embeddings needs none.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np


import mlflow

CODE = Path(__file__).with_name("served_model.py")
META_FILE = "xmodal.json"
# What the model needs at serve time, pinned to this environment. Passing them skips MLflow's requirement
# inference, which imports the model and scans it (about 9 s per logged model here).
SERVE_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "open-clip-torch", "transformers",
                  "timm", "pillow", "h5py")


def pip_requirements() -> list[str]:
    return [f"{p}=={importlib.metadata.version(p)}" for p in SERVE_PACKAGES]


def encoder_meta(store) -> dict[str, Any]:
    """What identifies one side's encoder, from the store its embeddings came from."""
    a = store.attrs
    return {"encoder_spec": a.get("encoder_spec"), "weights_digest": a.get("weights_digest"),
            "weights_origin": a.get("weights_origin"), "dim": int(store.dim), "modality": a.get("modality"),
            "store": str(store.path)}


def log_projector_model(projector_dir: str | Path, source_store, target_store, name: str = "projector") -> dict:
    """Log the projector folder as a no-pickle pyfunc model in the active run; returns its metadata."""
    import tempfile

    meta = {"format": "xmodal-projector/1", "source": encoder_meta(source_store),
            "target": encoder_meta(target_store)}
    with tempfile.TemporaryDirectory() as d:
        meta_path = Path(d) / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2))
        mlflow.pyfunc.log_model(name=name, python_model=str(CODE),
                                artifacts={"projector": str(projector_dir), "xmodal": str(meta_path)},
                                pip_requirements=pip_requirements(), metadata=meta)
    return meta


class ProjectorModel(mlflow.pyfunc.PythonModel):
    """Source encoder + stage-1 projector: raw inputs (or source embeddings) -> (N, D_tgt) float32."""

    def load_context(self, context) -> None:
        from projection.align.projector import load_projector

        self.meta = json.loads(Path(context.artifacts["xmodal"]).read_text())
        self.projector = load_projector(context.artifacts["projector"]).eval()
        self.encoder = None

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        import torch

        items = _as_items(model_input)
        if isinstance(items, np.ndarray):  # (N, D_src) embeddings already in the source space
            emb = torch.from_numpy(items)
            d_in = self.projector.cfg.d_in
            if emb.ndim != 2 or emb.shape[1] != d_in:
                raise ValueError(f"source embeddings must be (N, {d_in}) for this projector, got {tuple(emb.shape)}")
        else:
            encoder = self._encoder()
            self._check_modality(items, encoder.spec)
            emb = torch.cat([encoder.encode_items(items[i:i + 64]) for i in range(0, len(items), 64)])
        with torch.inference_mode():
            return self.projector(emb.float()).float().numpy()

    def _encoder(self):
        """The source encoder, once; refused when its weights are not the ones the projector was trained on."""
        if self.encoder is None:
            from encoders.factory import load_encoder

            src = self.meta["source"]
            encoder = load_encoder(src["encoder_spec"])
            if encoder.digest != src["weights_digest"]:
                raise ValueError(f"source encoder {src['encoder_spec']} loads weights with digest {encoder.digest}, "
                                 f"but this projector was trained on embeddings from weights digest "
                                 f"{src['weights_digest']}; restore those weights or promote a projector trained "
                                 "on these")
            self.encoder = encoder
        return self.encoder

    @staticmethod
    def _check_modality(items: list[str], spec) -> None:
        from projection.search.exact import looks_like_image_path

        for item in items:
            is_image = looks_like_image_path(item)
            if spec.tower == "image" and not (is_image and Path(item).is_file()):
                what = "an image path that does not exist" if is_image else "text"
                raise ValueError(f"input {item[:80]!r} is {what}, but this model's source encoder {spec} embeds "
                                 "images; pass paths of existing image files")
            if spec.tower == "text" and is_image:
                raise ValueError(f"input {item[:80]!r} is an image path, but this model's source encoder {spec} "
                                 "embeds text; pass texts")


def _as_items(model_input) -> list[str] | np.ndarray:
    """pyfunc inputs as they arrive (a list, a Series, a one-column DataFrame, an array) -> texts/paths or floats."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0] if model_input.shape[1] == 1 and model_input.dtypes.iloc[0] == object \
            else model_input.to_numpy()
    if isinstance(model_input, str):
        model_input = [model_input]
    values = np.asarray(model_input.tolist() if hasattr(model_input, "tolist") else list(model_input), dtype=object)
    if values.size == 0:
        raise ValueError("empty input: pass image paths, texts, or (N, D_src) source embeddings")
    if all(isinstance(v, str) for v in values.ravel()):
        return [str(v) for v in values.ravel()]
    try:
        return np.asarray(values.tolist(), dtype=np.float32)
    except (TypeError, ValueError):
        raise ValueError("input must be all strings (image paths or texts) or all numbers (source embeddings), "
                         f"got {sorted({type(v).__name__ for v in values.ravel()})}") from None
