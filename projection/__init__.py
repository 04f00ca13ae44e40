"""Stage-1 alignment: projectors, losses, closed-form baselines, metrics, data, training.

Plain torch/numpy/scipy/sklearn; no Prefect/MLflow (the flows wrap these). Exports resolve
lazily so `from projection.config import TrainConfig` does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "baselines": ["IdentityBaseline", "ProcrustesBaseline", "RidgeBaseline", "fit_baselines"],
    "config": ["BaselineConfig", "LossConfig", "ProjectorConfig", "SplitConfig", "TrainConfig"],
    "data": ["ArrayReader", "ChunkedPairs", "InMemoryPairs", "load_split", "make_split", "save_split"],
    "losses": ["build_loss"],
    "metrics": ["alignment_metrics", "similarity_matrix", "zero_shot"],
    "projector": ["Projector", "load_projector", "make_projector", "save_projector"],
    "train": ["TrainResult", "predict", "train_projector"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f"projection.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'projection' has no attribute {name!r}")
