"""Reward names -> implementations: the built-in rewards, and rewards added from outside apex.

A reward from outside apex needs no change to this package. An objective names it either

- by where it lives, ``package.module:ClassName``: imported when an objective names it (local
  code the user chose to run, never fetched); its key is the class's ``name`` (default: the
  class name, lowercased), so its columns read ``reward/<key>/...``;
- or by the name its package installs under the entry-point group ``apexcli.rewards``
  (``[project.entry-points."apexcli.rewards"] redness = "my_rewards:Redness"``).

Its options come from ``rewards.extra.<key>``, typed and checked by the class's ``Options``
dataclass. Model rewards are imported only when built.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import torch

from apexcli.config_upgrade import reject_old_keys
from apexcli.errors import ApexError
from apexcli.rewards.base import Reward
from apexcli.rewards.config import RewardsConfig
from apexcli.schema import check_fields, from_dict

ENTRY_POINT_GROUP = "apexcli.rewards"


@dataclass(frozen=True)
class RewardSpec:
    """Where a reward lives and what it needs."""

    module: str  # importable module
    cls: str  # class name in that module
    section: str  # RewardsConfig field holding its options ("": rewards.extra.<key>)
    needs_prompt: bool  # reads the prompt
    summary: str  # one line for --help and errors


def _builtin(module: str, cls: str, section: str, needs_prompt: bool, summary: str) -> RewardSpec:
    return RewardSpec(f"apexcli.rewards.{module}", cls, section, needs_prompt, summary)


REGISTRY: dict[str, RewardSpec] = {
    "pick": _builtin("pick", "PickScore", "pick", True, "PickScore_v1: 100·cos(image, text), ≈ 21–24"),
    "aes": _builtin("aes", "Aesthetic", "aes", False, "LAION improved aesthetic MLP on CLIP ViT-L/14, ≈ 5–6.5"),
    "deqa": _builtin("deqa", "DeQAScore", "deqa", False, "DeQA-Score image quality, 1–5"),
    "ocr": _builtin("ocr", "OcrReward", "ocr", True, "1 − min(lev, len)/len vs the prompt's quoted text"),
    "brightness": _builtin("toy", "Brightness", "toy", False, "mean luma, 0–1"),
    "colorfulness": _builtin("toy", "Colorfulness", "toy", False, "Hasler–Süsstrunk, 0–255 scale"),
    "compressibility": _builtin("toy", "Compressibility", "toy", False, "−JPEG size in kB"),
    "contrast": _builtin("toy", "Contrast", "toy", False, "RMS contrast of luma, 0–0.5"),
    # the miniature world's stand-ins for pick, deqa and aes (weight-free; docs/method/mini-world.md)
    "adherence": _builtin(
        "adherence", "Adherence", "toy", True, "world prompt adherence from pixels, 16–24 (pick's role)"
    ),
    "quality": _builtin("quality", "Quality", "toy", False, "crisp edges + clean flat regions, 1–5 (deqa's role)"),
    "appeal": _builtin("appeal", "Appeal", "toy", False, "centring, coverage, harmony, contrast, 5–6.5 (aes's role)"),
}
ALIASES = {"pickscore": "pick", "aesthetic": "aes", "aesthetics": "aes"}
REWARD_NAMES: tuple[str, ...] = tuple(sorted(REGISTRY))
"""The built-in rewards."""

_ADDED: dict[str, RewardSpec] = {}
"""Rewards from outside apex, by key, once an objective has named them (in this process)."""
_CLASSES: dict[str, type[Reward]] = {}
_KEY = re.compile(r"[a-z0-9_][a-z0-9_-]*")  # a metric column and a config key: no "/", "." or "@"


def split_remote(objective: str) -> tuple[str, str]:
    """'deqa@http://host:port' -> ('deqa', 'http://host:port'); 'pick' -> ('pick', '')."""
    name, sep, url = objective.strip().partition("@")
    return name.strip(), url.strip() if sep else ""


def canonical_name(name: str) -> str:
    """The objective's key: aliases resolved (pickscore -> pick), a ``module:Class`` or an
    installed entry point added. Unknown names raise ApexError listing the valid ones."""
    key = split_remote(name)[0]
    if ":" in key:
        module, _, attr = key.partition(":")
        return _add(_import_reward(module.strip(), attr.strip(), key), key)
    key = ALIASES.get(key.lower(), key.lower())
    if key in REGISTRY or key in _ADDED:
        return key
    installed = _installed()
    if key in installed:
        return _add(_import_reward(installed[key].module, installed[key].attr, f"entry point '{key}'"), key, key=key)
    others = f"; installed: {', '.join(sorted(installed))}" if installed else ""
    raise ApexError(
        f"unknown objective {name!r}; valid: {', '.join(REWARD_NAMES)}{others}; "
        "or a reward of your own as package.module:ClassName"
    )


def reward_spec(key: str) -> RewardSpec:
    """The spec of a canonical key (``canonical_name``'s result)."""
    return REGISTRY[key] if key in REGISTRY else _ADDED[canonical_name(key)]


def reward_class(name: str) -> type[Reward]:
    key = canonical_name(name)
    if key in _CLASSES:
        return _CLASSES[key]
    return getattr(importlib.import_module(REGISTRY[key].module), REGISTRY[key].cls)


def resolve_objective(objective: str) -> tuple[str, str]:
    """'deqa@URL' -> ('deqa', URL); 'deqa' -> ('deqa', ''): the reward and the server that scores
    it ('' = in process), decided once for the suite and the doctor checks alike."""
    name, url = split_remote(objective)
    return canonical_name(name), url


def remote_batch_size(key: str, config: RewardsConfig) -> int:
    """Images per request to a reward server: the reward's own batch size where it has one."""
    section = reward_spec(key).section
    return getattr(getattr(config, section), "batch_size", 32) if section else 32


def needs_prompt(name: str) -> bool:
    return reward_spec(canonical_name(name)).needs_prompt


def build_reward(name: str, config: RewardsConfig, device: torch.device | str, dtype: torch.dtype) -> Reward:
    """Build the in-process reward `name` with its options."""
    key = canonical_name(name)
    cls = reward_class(key)
    options = getattr(config, reward_spec(key).section) if reward_spec(key).section else _options(cls, key, config)
    return cls(options, device=device, dtype=dtype)


def _options(cls: type[Reward], key: str, config: RewardsConfig) -> Any:
    """``rewards.extra.<key>`` as the reward's ``Options`` dataclass, typed and range-checked."""
    data = dict(config.extra.get(key, {}))
    prefix = f"rewards.extra.{key}."
    reject_old_keys({"rewards": {"extra": {key: data}}})
    if cls.Options is None:
        if data:
            raise ApexError(
                f"config key '{prefix}{next(iter(data))}' is set, but reward '{key}' takes no options "
                "(its class declares no Options dataclass)"
            )
        return None
    options = from_dict(cls.Options, data, prefix)
    check_fields(options, prefix)
    return options


def _installed() -> dict[str, EntryPoint]:
    return {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _import_reward(module: str, attr: str, where: str) -> type[Reward]:
    """The class ``attr`` of ``module``, checked to be a Reward; import failures are one line."""
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ApexError(
            f"reward {where}: cannot import module '{module}' ({exc}); put its folder on PYTHONPATH "
            "or install its package"
        ) from None
    except AttributeError:
        raise ApexError(f"reward {where}: module '{module}' has no class '{attr}'") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ApexError(f"reward {where}: {module}:{attr} is not a subclass of apexcli.rewards.base.Reward")
    return cls


def _add(cls: type[Reward], where: str, *, key: str | None = None) -> str:
    """Register a reward from outside apex under ``key`` (default: its ``name`` or class name)."""
    key = (key or cls.name or cls.__name__).lower()
    if not _KEY.fullmatch(key):
        raise ApexError(f"reward {where} is named {key!r}; a reward's name is letters, digits, '_' and '-'")
    if key in REGISTRY or key in ALIASES:
        raise ApexError(f"reward {where} is named '{key}', as a built-in reward is; give its class another `name`")
    spec = RewardSpec(
        cls.__module__, cls.__qualname__, "", cls.needs_prompt, (cls.__doc__ or "").strip().split("\n")[0]
    )
    other = _ADDED.get(key)
    if other is not None and (other.module, other.cls) != (spec.module, spec.cls):
        raise ApexError(
            f"rewards {other.module}:{other.cls} and {where} are both named '{key}'; give one another `name`"
        )
    _ADDED[key], _CLASSES[key] = spec, cls  # a module imported again replaces its class
    return key
