"""Which shipped recipe a model family trains with, and the settings of a config that still hold
another family's recipe value (a FLUX model started from the SD3 defaults)."""

from __future__ import annotations

from functools import cache

from apexcli.backbones import BACKBONES, Backbone
from apexcli.config import Config, resolve_config

RECIPE_PRESETS = {"sd3": "sd35m", "flux": "flux1-dev"}
"""The preset that carries each family's reference recipe (Flow-GRPO's, for both)."""
RECIPE_KEYS = (
    "sampling.num_steps",
    "sampling.noise_level",
    "sampling.guidance_scale",
    "train.kl_beta",
    "lora.rank",
    "lora.alpha",
    "eval.num_steps",
    "eval.guidance_scale",
)
"""The settings where the families' recipes differ and a wrong one silently trains another recipe."""


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@cache
def _recipe(family: str) -> Config:
    return resolve_config(preset=RECIPE_PRESETS[family])


def foreign_recipe_values(values: dict[str, float], family: Backbone) -> list[str]:
    """``key=value (preset: value)`` for each of ``values`` (recipe keys) that equals another
    family's recipe and differs from ``family``'s own, when at least half of them do: then the
    values are another recipe's defaults, which a user most likely never chose. One such value
    alone (6 steps for SD3) is a choice, and says nothing."""
    own = _recipe(family.family)
    found = []
    for key, value in values.items():
        wanted = _get(own, key)
        if value == wanted:
            continue
        if any(_get(_recipe(b.family), key) == value for b in BACKBONES if b.family != family.family):
            found.append(f"{key}={value:g} ({RECIPE_PRESETS[family.family]}: {wanted:g})")
    return found if 2 * len(found) >= len(values) else []


def foreign_recipe_settings(cfg: Config, family: Backbone) -> list[str]:
    """``foreign_recipe_values`` of every recipe setting of ``cfg``."""
    return foreign_recipe_values({key: _get(cfg, key) for key in RECIPE_KEYS}, family)
