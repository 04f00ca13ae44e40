"""One name per concept across the CLI, the flows' params and the configs.

Reads the typer app's options (``typer.main.get_command``) and the pydantic models' fields; runs nothing.
That the CLI's options ARE the models' fields is tests/flows/test_cli.py's job.
"""

from __future__ import annotations

import inspect
from typing import get_args

import pytest
from pydantic import BaseModel
from typer.main import get_command

from flows.align import AlignParams
from flows.cli import app
from flows.contrastive import ContrastiveParams
from flows.extract import ExtractParams
from flows.finetune import FinetuneParams
from flows.pipeline import PipelineParams
from projection.losses.registry import LOSS_NAMES, LossName
from projection.finetune.config import TaskName, UnfreezePolicy
from projection.finetune.tasks import TASKS

PARAMS = [ExtractParams, AlignParams, FinetuneParams, ContrastiveParams, PipelineParams]

# concept -> (the one name, names it must not also go by)
CONCEPTS = {
    "source store (.h5)": ("source_store", {"source", "src", "source_path", "src_store"}),
    "target store (.h5)": ("target_store", {"target", "tgt", "target_path", "tgt_store"}),
    "stage-1 projector folder": ("projector_dir", {"projector_path", "projector_folder", "projector_file"}),
    "source encoder spec": ("source_encoder", {"src_encoder", "encoder_a", "source_spec"}),
    "source modality column": ("source_column", {"src_column", "column_source", "source_col"}),
    "class-label column": ("label_column", {"labels_column", "label_col", "class_column_name"}),
    "output folder": ("out_dir", {"output_dir", "outdir", "out", "output"}),
    "MLflow parent run": ("parent_run_id", {"parent", "parent_run", "parent_id"}),
}


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every field of a params model, nested configs included: dotted name -> FieldInfo."""
    out = {}
    for name, info in model.model_fields.items():
        out[prefix + name] = info
        if inspect.isclass(info.annotation) and issubclass(info.annotation, BaseModel):
            out |= _fields(info.annotation, f"{prefix}{name}.")
    return out


def _cli_options() -> dict[str, dict[str, object]]:
    """command -> {option name: default} (parameters as the Python names typer binds them to)."""
    group = get_command(app)
    return {cmd: {p.name: p.default for p in command.params} for cmd, command in group.commands.items()}


def _all_names() -> dict[str, str]:
    """Every name a user meets -> where: CLI options and params/config fields (leaf names)."""
    names = {f"{name}": f"xmodal {cmd}" for cmd, opts in _cli_options().items() for name in opts}
    for model in PARAMS:
        names |= {dotted.rsplit(".", 1)[-1]: f"{model.__name__}.{dotted}" for dotted in _fields(model)}
    return names


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_each_concept_goes_by_one_name(concept):
    canonical, synonyms = CONCEPTS[concept]
    names = _all_names()
    used = {n: where for n, where in names.items() if n in synonyms}
    assert not used, f"{concept} is called {canonical!r}, but also {used}"
    assert canonical in names, f"{canonical!r} is used nowhere: the table is stale"


def test_every_flow_takes_one_argument_named_params_typed_as_a_params_model():
    import flows.align as align_m
    import flows.contrastive as contrastive_m
    import flows.extract as extract_m
    import flows.finetune as finetune_m
    import flows.pipeline as pipeline_m

    flows = [extract_m.extract_embeddings, align_m.align, finetune_m.finetune, contrastive_m.contrastive_train,
             pipeline_m.pipeline]
    for f in flows:
        sig = inspect.signature(f.fn)
        assert list(sig.parameters) == ["params"], f"{f.name}: {list(sig.parameters)}"
        hint = sig.parameters["params"].annotation
        assert (hint if isinstance(hint, str) else hint.__name__).endswith("Params"), f"{f.name}: {hint}"
    assert all(m.__name__.endswith("Params") for m in PARAMS)


def test_each_family_has_one_list_of_names_that_the_literals_and_cli_help_use():
    assert tuple(get_args(TaskName)) == tuple(TASKS), "stage-2 tasks: the Literal and the TASKS registry differ"
    assert tuple(get_args(LossName)) == LOSS_NAMES
    assert tuple(get_args(TaskName)) and tuple(get_args(UnfreezePolicy))
