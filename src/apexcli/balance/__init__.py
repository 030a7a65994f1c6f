"""Balancing K rewards into one GRPO advantage: static, gdpo, apex (DSAN + P³), dwa, mgda, random,
pareto (dominance filter).

    from apexcli.balance import build_balancer
    b = build_balancer("apex", objectives=["pick", "ocr"], weights=None, tau=0.5)
    advantages, info = b(rewards, groups)    # rewards [N, K] (NaN allowed), groups [N]

Formulas: each strategy's docstring and docs/method/balancing.md.
"""

from __future__ import annotations

import dataclasses

from apexcli.balance.apex import ApexBalancer
from apexcli.balance.base import Balancer
from apexcli.balance.config import (
    STRATEGIES,
    ApexConfig,
    BalanceConfig,
    BalanceExperimental,
    DwaConfig,
    MgdaConfig,
    ParetoConfig,
    RandomConfig,
    StaticConfig,
)
from apexcli.balance.dwa import DwaBalancer
from apexcli.balance.gdpo import GdpoBalancer
from apexcli.balance.mgda import MgdaBalancer
from apexcli.balance.pareto import ParetoBalancer
from apexcli.balance.random_weights import RandomBalancer
from apexcli.balance.static import StaticBalancer
from apexcli.errors import ApexError

BALANCERS: dict[str, type[Balancer]] = {
    "static": StaticBalancer,
    "gdpo": GdpoBalancer,
    "apex": ApexBalancer,
    "dwa": DwaBalancer,
    "mgda": MgdaBalancer,
    "random": RandomBalancer,
    "pareto": ParetoBalancer,
}
assert tuple(BALANCERS) == STRATEGIES

__all__ = [
    "BALANCERS",
    "ApexConfig",
    "BalanceConfig",
    "BalanceExperimental",
    "Balancer",
    "DwaConfig",
    "MgdaConfig",
    "ParetoConfig",
    "RandomConfig",
    "StaticConfig",
    "build_balancer",
    "build_balancer_from_config",
]

_SECTIONS = ("apex", "dwa", "mgda", "random", "static", "pareto")  # strategies with their own config section
_EXPERIMENTAL = {f.name for f in dataclasses.fields(BalanceExperimental)}
_TOP_LEVEL = {f.name for f in dataclasses.fields(BalanceConfig)} - {"strategy", "weights", "experimental", *_SECTIONS}


def build_balancer_from_config(cfg: BalanceConfig, objectives: list[str]) -> Balancer:
    """The balancer ``cfg.strategy`` for these objectives (validates cfg first)."""
    if cfg.strategy not in BALANCERS:
        raise ApexError(f"unknown balance strategy '{cfg.strategy}'; valid: {', '.join(BALANCERS)}")
    return BALANCERS[cfg.strategy](list(objectives), cfg)


def build_balancer(name: str, objectives: list[str], weights: list[float] | None = None, **options) -> Balancer:
    """Build a balancer without a run config.

    ``options`` are BalanceConfig fields (``eps``, ``probe_every``, ``std_scope``, ...), fields
    of the strategy's own section (``tau=0.5`` for apex, ``temperature`` for dwa, ...) or of
    ``experimental`` (``progress_prompts``), or a whole section (``apex=ApexConfig(...)`` or a dict).
    """
    if name not in BALANCERS:
        raise ApexError(f"unknown balance strategy '{name}'; valid: {', '.join(BALANCERS)}")
    cfg = BalanceConfig(strategy=name, weights=None if weights is None else [float(w) for w in weights])
    section_name = name if name in _SECTIONS else None
    for key, value in options.items():
        if key in _TOP_LEVEL:
            setattr(cfg, key, value)
        elif key in (*_SECTIONS, "experimental"):
            current = getattr(cfg, key)
            setattr(cfg, key, dataclasses.replace(current, **value) if isinstance(value, dict) else value)
        elif section_name and key in {f.name for f in dataclasses.fields(getattr(cfg, section_name))}:
            setattr(getattr(cfg, section_name), key, value)
        elif key in _EXPERIMENTAL:
            setattr(cfg.experimental, key, value)
        else:
            section = getattr(cfg, section_name) if section_name else None
            valid = sorted(
                _TOP_LEVEL | _EXPERIMENTAL | ({f.name for f in dataclasses.fields(section)} if section else set())
            )
            raise ApexError(f"unknown option '{key}' for balance strategy '{name}'; valid: {', '.join(valid)}")
    return build_balancer_from_config(cfg, objectives)
