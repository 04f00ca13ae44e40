"""Where an encoder's blocks, final norms and projections are: what stage 2's ``last_n`` unfreezes.

Each backend answers for its own models through ``FrozenEncoder.layout()`` (open_clip, HF; a new
backend implements the method): the structure of a model is the backend's knowledge, not the
fine-tuning code's. Names are qualified names relative to ``encoder.module`` and resolve with
torch's own ``get_submodule`` / ``get_parameter``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# transformers keeps its block stack under one of these names (first match wins)
HF_BLOCK_PATHS = ("encoder.layer", "encoder.layers", "transformer.layer", "transformer.layers", "layers", "h",
                  "transformer.h", "encoder.block", "text_model.encoder.layers", "vision_model.encoder.layers",
                  "model.layers", "blocks")  # fmt: skip
HF_POST_NAMES = ("layernorm", "layer_norm", "final_layer_norm", "post_layernorm", "final_layernorm", "ln_f", "norm", "ln_post")
_STACK_NAMES = ("layer", "layers", "h", "block", "blocks", "resblocks")


@dataclass(frozen=True)
class EncoderLayout:
    """Qualified names (relative to ``encoder.module``) that the unfreeze policies work with."""

    blocks: list[str]  # the repeated blocks, in forward order (what last_n counts)
    post: list[str]  # modules/parameters applied after the last block (trained with last_n)
    tower: list[str]  # everything of the tower in use (trained with "all"); "" = the whole module
    exclude: list[str] = field(default_factory=list)  # inside the tower but unused by forward (never trained)


def module_at(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def present(root: nn.Module, name: str) -> bool:
    """A submodule holding parameters, or a parameter, lives at ``name``."""
    m = module_at(root, name)
    if m is not None:
        return any(True for _ in m.parameters())
    try:
        root.get_parameter(name)
        return True
    except AttributeError:
        return False


def children(root: nn.Module, name: str) -> list[str]:
    """Qualified names of the entries of the ModuleList / Sequential at ``name``."""
    return [f"{name}.{i}" for i in range(len(root.get_submodule(name)))]


def first_present(root: nn.Module, names: tuple[str, ...] | list[str]) -> list[str]:
    return [n for n in names if present(root, n)]


def _hf_stack(model: nn.Module, what: str) -> str:
    stack = next((p for p in HF_BLOCK_PATHS if isinstance(module_at(model, p), nn.ModuleList)), None)
    if stack is not None:
        return stack
    cands = [(len(m), n) for n, m in model.named_modules()  # fallback: the longest list named like a stack
             if isinstance(m, nn.ModuleList) and n.rsplit(".", 1)[-1] in _STACK_NAMES and len(m)]
    if not cands:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} ({what}); looked for "
                         f"{', '.join(HF_BLOCK_PATHS)} and any ModuleList named layer(s)/h/block(s). "
                         "Use unfreeze='none' or 'all' for this encoder.")
    return max(cands)[1]


def hf_layout(root: nn.Module, prefix: str, pooling: str, what: str) -> tuple[list[str], list[str], list[str]]:
    """(blocks, post, exclude) of a transformers model living at ``prefix`` ('' = root)."""
    model = root.get_submodule(prefix)  # get_submodule('') is root itself
    stack = _hf_stack(model, what)
    # final norms sit next to the stack, or one level up: ViT 'layernorm', CLIP 'text_model.final_layer_norm', Llama 'model.norm'
    parent = stack.rsplit(".", 1)[0] if "." in stack else ""
    grandparent = parent.rsplit(".", 1)[0] if "." in parent else ""
    post: list[str] = []
    for base in dict.fromkeys([parent, grandparent, ""]):
        for name in HF_POST_NAMES:
            full = f"{base}.{name}" if base else name
            if full not in post and present(model, full):
                post.append(full)
    exclude = []
    if present(model, "pooler"):
        (post if pooling == "pooler" else exclude).append("pooler")
    j = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731
    return [j(b) for b in children(model, stack)], [j(p) for p in post], [j(e) for e in exclude]


def timm_layout(root: nn.Module, prefix: str, what: str) -> tuple[list[str], list[str]]:
    """(blocks, post) of a timm model at ``prefix``: its ``blocks``/``stages``/``layers`` and final norm/head.

    Used for open_clip's timm towers; a timm backend can answer ``layout()`` with it too.
    """
    trunk = root.get_submodule(prefix)
    stack = next((s for s in ("blocks", "stages", "layers") if isinstance(getattr(trunk, s, None), (nn.Sequential, nn.ModuleList))), None)
    if stack is None:
        raise ValueError(f"cannot find the blocks of the timm model {type(trunk).__name__} ({what})")
    j = (lambda n: f"{prefix}.{n}" if prefix else n)  # noqa: E731
    return children(root, j(stack)), first_present(root, [j(n) for n in ("norm", "fc_norm", "head")])
