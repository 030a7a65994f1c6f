"""Model families behind one interface; the family is read off the transformer, the pipeline
or ``model_index.json``'s ``_class_name``, so callers never name one."""

from __future__ import annotations

import torch

from apexcli.backbones.base import Backbone, model_dtype, unwrap_model
from apexcli.backbones.flux import FluxBackbone
from apexcli.backbones.sd3 import SD3Backbone
from apexcli.errors import ApexError

BACKBONES: tuple[Backbone, ...] = (SD3Backbone(), FluxBackbone())
_BY_TRANSFORMER = {b.transformer_class: b for b in BACKBONES}
_BY_PIPELINE = {b.pipeline_class: b for b in BACKBONES}

__all__ = [
    "BACKBONES",
    "Backbone",
    "backbone_of",
    "backbone_of_pipeline",
    "backbone_for_class",
    "model_dtype",
    "unwrap_model",
]


def _match(obj_type: type, table: dict[str, Backbone]) -> Backbone | None:
    """The entry of the first class in ``obj_type``'s MRO: FSDP2 and test doubles subclass the model."""
    for cls in obj_type.__mro__:
        found = table.get(cls.__name__)
        if found is not None:
            return found
    return None


def backbone_of(transformer: torch.nn.Module) -> Backbone:
    """The family of a (possibly wrapped) transformer; SD3 for anything unrecognised, the only
    family before there were several (memory-plan doubles and test stand-ins)."""
    return _match(type(unwrap_model(transformer)), _BY_TRANSFORMER) or _BY_TRANSFORMER["SD3Transformer2DModel"]


def backbone_of_pipeline(pipe) -> Backbone:
    """The family of a loaded pipeline, by its class, else by its transformer's."""
    found = _match(type(pipe), _BY_PIPELINE)
    if found is not None:
        return found
    transformer = getattr(pipe, "transformer", None)
    return backbone_of(transformer) if transformer is not None else _BY_PIPELINE["StableDiffusion3Pipeline"]


def backbone_for_class(class_name: str, where: str) -> Backbone:
    """The family of ``model_index.json``'s ``_class_name``; an ApexError for any other pipeline."""
    found = _BY_PIPELINE.get(class_name)
    if found is None:
        known = ", ".join(sorted(_BY_PIPELINE))
        raise ApexError(f"{where} is a {class_name}; apex trains only {known}")
    return found
