"""A stage-1 projector as an MLflow pyfunc model with no pickle in it: raw inputs in, target-space embeddings out.

``mlflow.pytorch.log_model`` pickles the module (``model.pth``), and loading it runs whatever the pickle says;
a ``PythonModel`` instance logged the usual way is a cloudpickle too. Here the model is MLflow's
"models from code": the code is ``flows/tracking/served_model.py`` (a plain file MLflow copies and imports), and the
artifacts are the project's own projector files (safetensors + JSON) plus ``xmodal.json``, which names the
source and target encoders (spec, weights digest, dim, modality) the projector was trained between.

``predict`` takes a table with one of two columns (the model's signature, which MLflow's UI and
``mlflow models serve`` show): ``input``, raw inputs (image paths or texts: the source encoder, then the
projector), or ``embedding``, vectors already in the source space (the projector alone). Over REST::

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"dataframe_records": [{"input": "a photo of a shoe"}]}'

Raw inputs of the wrong modality are refused with HTTP 400 and xmodal's one-line message (no stack trace), and so
is a source encoder whose weights no longer hash to the digest the projector was trained on: both errors name
the two sides. The encoder is loaded on the first raw input, so projecting stored embeddings needs none.
"""

from __future__ import annotations

import importlib.metadata
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.schema import Array

CODE = Path(__file__).with_name("served_model.py")
META_FILE = "xmodal.json"
# What the model needs at serve time, pinned to this environment. Passing them skips MLflow's requirement
# inference, which imports the model and scans it (about 9 s per logged model here).
SERVE_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "safetensors", "pydantic", "open-clip-torch", "transformers",
                  "timm", "pillow", "h5py")


# The model's inputs: exactly one of the two columns per call. A signature lets MLflow's UI and the scoring
# server show and check what the model takes; its absence made the REST caller guess.
SIGNATURE_INPUTS = Schema([ColSpec(DataType.string, "input", required=False),  # image paths or texts
                           ColSpec(Array(DataType.double), "embedding", required=False)])  # (D_src,) each


def conda_env() -> dict:
    """The environment the model needs, spelled out: the pinned packages below, and pip itself unpinned (a uv-made
    environment has no pip to read a version from; MLflow's own inference warned "Failed to resolve installed pip
    version" on every logged model)."""
    import sys

    return {"name": "xmodal-serve", "channels": ["conda-forge"],
            "dependencies": [f"python={sys.version_info.major}.{sys.version_info.minor}", "pip",
                             {"pip": [f"{p}=={importlib.metadata.version(p)}" for p in SERVE_PACKAGES]}]}


class InputError(MlflowException):
    """A request the caller must fix: HTTP 400 with xmodal's one line as ``message``.

    MLflow's scoring server turns any other exception into "Encountered an unexpected error ..." with the whole
    traceback (server paths included) in ``stack_trace``, and prefixes an MlflowException's message with
    "Failed to predict data '<the whole payload>'"; the message here stays the one line that names the input
    and what to do."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self.__dict__["_one_line"]

    @message.setter
    def message(self, value: str) -> None:  # MLflow's wrapper assigns a prefixed copy: keep the first
        self.__dict__.setdefault("_one_line", value)


class EncoderChanged(ValueError):
    """The encoder the server loads is not the one the projector was trained after (its weights digest differs)."""


def spec_parts(spec: str | None) -> dict[str, str]:
    """{'modality': 'image', 'encoder': 'timm:tf_efficientnet_lite0.in1k'} from a spec; {} for a store that names
    no parseable encoder (synthetic test stores)."""
    from encoders.spec import EncoderSpec

    try:
        s = EncoderSpec.parse(spec or "")
    except ValueError:
        return {}
    return {"modality": s.tower, "encoder": f"{s.backend}:{s.model.rstrip('/').split('/')[-1]}"}


def encoder_meta(store) -> dict[str, Any]:
    """What identifies one side's encoder, from the store its embeddings came from. ``modality`` is what the
    encoder embeds (image or text, from its spec); ``column`` the manifest column the store was made from."""
    a = store.attrs
    spec = a.get("encoder_spec")
    return {"encoder_spec": spec, "weights_digest": a.get("weights_digest"),
            "weights_origin": a.get("weights_origin"), "dim": int(store.dim),
            "modality": spec_parts(spec).get("modality"), "column": a.get("modality"),
            "store": str(store.path)}


def log_projector_model(projector_dir: str | Path, source_store, target_store, name: str = "projector") -> dict:
    """Log the projector folder as a no-pickle pyfunc model in the active run; returns its metadata."""
    import tempfile

    meta = {"format": "xmodal-projector/1", "source": encoder_meta(source_store),
            "target": encoder_meta(target_store)}
    with tempfile.TemporaryDirectory() as d:
        meta_path = Path(d) / META_FILE
        meta_path.write_text(json.dumps(meta, indent=2))
        example = pd.DataFrame({"embedding": [np.zeros(int(source_store.dim)).tolist()]})  # the projector alone
        with warnings.catch_warnings():
            # MLflow 3.17 compares a DataFrame example's columns to a range (mlflow/models/utils.py), which pandas 3
            # deprecates: its bug, not ours, and the only warning left once the example is given. Just that one.
            warnings.filterwarnings("ignore", message="Operation with range is deprecated", module="mlflow")
            mlflow.pyfunc.log_model(name=name, python_model=str(CODE),
                                    artifacts={"projector": str(projector_dir), "xmodal": str(meta_path)},
                                    conda_env=conda_env(), metadata=meta, input_example=example,
                                    signature=ModelSignature(inputs=SIGNATURE_INPUTS,
                                                             outputs=Schema([TensorSpec(np.dtype(np.float32),
                                                                                        (-1, int(target_store.dim)))])))
    return meta


class ProjectorModel(mlflow.pyfunc.PythonModel):
    """Source encoder + stage-1 projector: raw inputs (or source embeddings) -> (N, D_tgt) float32."""

    def load_context(self, context) -> None:
        from projection.align.projector import load_projector

        self.meta = json.loads(Path(context.artifacts["xmodal"]).read_text())
        self.projector = load_projector(context.artifacts["projector"]).eval()
        self.encoder = None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        """(N, D_tgt) float32 for N inputs; a request the caller must fix raises InputError (HTTP 400)."""
        try:
            return self._predict(model_input)
        except InputError:
            raise
        except EncoderChanged:  # the server's encoder weights changed: not the caller's to fix
            raise
        except ValueError as exc:
            raise InputError(str(exc)) from None

    def _predict(self, model_input) -> np.ndarray:
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
                raise EncoderChanged(f"source encoder {src['encoder_spec']} loads weights with digest {encoder.digest}, "
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
    """pyfunc inputs as they arrive (the signature's ``input`` or ``embedding`` column; without a signature also a
    list, a Series, a one-column DataFrame, an array) -> texts/paths or floats."""
    if isinstance(model_input, pd.DataFrame):
        given = [c for c in ("input", "embedding") if c in model_input and model_input[c].notna().any()]
        if len(given) == 2:
            raise ValueError("pass either 'input' (image paths or texts) or 'embedding' (source-space vectors), "
                             "not both in one request")
        if given:
            model_input = model_input[given[0]]
            if given[0] == "embedding":
                model_input = np.asarray(model_input.tolist(), dtype=np.float32)
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
