"""Keys that older versions of apex wrote, and what each became.

A run's ``config.yaml`` holds every key of the version that wrote it. So that ``apex eval``,
``apex pareto``, ``apex soup`` and ``--resume`` keep working on runs written before a key moved,
``upgrade_config`` rewrites such a config into today's keys; ``config_from_dict`` applies it,
and so does ``--config FILE`` (which may be an old run's ``config.yaml``).

Anywhere else (a preset, a command-line option, a ``key=value`` override) an old key is a
one-line error naming what replaced it (``reject_old_keys``): there it is something the user can
fix at once, and a silent translation would hide that the setting changed.

``OLD_KEYS`` is the whole table: each entry is an old dotted key, what to write instead (or why
it is gone), and how its value carries over. A value that today's keys cannot express (a setting
that was removed) is dropped, and ``upgrade_config`` returns a note saying so.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apexcli.errors import ApexError

_MISSING = object()


def get_key(data: dict, dotted: str, default: Any = _MISSING) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_key(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def pop_key(data: dict, dotted: str) -> Any:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return _MISSING
    return node.pop(last)


# ---------------------------------------------------------------------------------------------
# how each old value carries over: (config being upgraded, the old value, the old key) -> a note or None
# ---------------------------------------------------------------------------------------------

Carry = Callable[[dict, Any, str], "str | None"]


def _moved(new: str) -> Carry:
    def carry(data: dict, value: Any, key: str) -> None:
        if get_key(data, new) is _MISSING:  # a config that already has the new key keeps it
            set_key(data, new, value)

    return carry


def _gradient_accumulation(data: dict, value: Any, key: str) -> str | None:
    """``gradient_accumulation`` g micro-batches per optimizer step, with the old
    ``optimizer_steps_per_epoch`` 0 meaning "as g says": k = ceil(micro-batches / g) steps, the
    micro-batches of one process (g = 0: one step)."""
    steps = get_key(data, "train.optimizer_steps_per_epoch", 0)
    if steps:
        return None
    from apexcli.config import TrainConfig  # the defaults of keys a partial file leaves out

    t = TrainConfig()
    sizes = [
        value or 0,
        get_key(data, "train.prompts_per_step", t.prompts_per_step),
        get_key(data, "train.group_size", t.group_size),
        get_key(data, "train.train_batch_size", t.train_batch_size),
    ]
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sizes) or not sizes[3]:
        return "could not be carried over: set train.optimizer_steps_per_epoch"
    g, prompts, group, micro_size = sizes
    micro = max(1, prompts * group // micro_size)
    set_key(data, "train.optimizer_steps_per_epoch", 1 if g == 0 else max(1, math.ceil(micro / g)))
    return None


def _removed(neutral: Any) -> Carry:
    """A setting that is gone: its neutral value (what the run did without it) carries over as
    nothing; any other value is noted as dropped."""

    def carry(data: dict, value: Any, key: str) -> str | None:
        return None if value == neutral else "is no longer a setting: ignored"

    return carry


def _apex_terms(data: dict, value: Any, key: str) -> str | None:
    """``terms: "lp,pn"``: a term left out has coefficient 0 (what the balancer did with it)."""
    terms = {t.strip().lower() for t in str(value).split(",") if t.strip()}
    unknown = terms - {"lp", "cp", "pn"}
    if unknown:
        return f"could not be carried over (unknown term {sorted(unknown)[0]!r}): set balance.apex.b_lp, b_cp, b_pn"
    for term in ("lp", "cp", "pn"):
        if term not in terms:
            set_key(data, f"balance.apex.b_{term}", 0.0)
    return None


def _apex_dsan(data: dict, value: Any, key: str) -> None:
    """``dsan: false`` was gdpo's stage 1 (std + eps): today's ``rho: 0``."""
    if value is False:
        set_key(data, "balance.apex.rho", 0.0)


OLD_STATIC_EPS, OLD_EPS = 1e-4, 1e-6


def _static_eps(data: dict, value: Any, key: str) -> None:
    """``balance.static.eps`` (static's std of R) and ``balance.eps`` (everything else): one
    ``balance.eps``, null = each strategy's own (1e-4 static, 1e-6 the others)."""
    strategy = get_key(data, "balance.strategy", None)
    eps = get_key(data, "balance.eps", None)
    if strategy == "static":
        same = value == OLD_STATIC_EPS and eps in (None, OLD_EPS)
        set_key(data, "balance.eps", None if same else value)
    elif eps == OLD_EPS:
        set_key(data, "balance.eps", None)


def _drop_zero(strategy: str) -> Carry:
    """The strategy's own switch for dropping A = 0 samples: ``balance.drop_zero_advantage`` when
    that strategy trained the run and the switch was off (on is every strategy's default there)."""

    def carry(data: dict, value: Any, key: str) -> None:
        if get_key(data, "balance.strategy", None) == strategy and value is False:
            set_key(data, "balance.drop_zero_advantage", False)

    return carry


def _reward_url(data: dict, value: Any, key: str) -> str | None:
    """``rewards.<section>.url`` or ``rewards.extra.<reward>.url``: the objectives naming that
    reward become ``reward@URL``."""
    parts = key.split(".")
    reward = parts[2] if parts[1] == "extra" else parts[1]
    if parts[1] == "extra" and get_key(data, f"rewards.extra.{reward}", None) == {}:
        pop_key(data, f"rewards.extra.{reward}")  # only the url was set
    if not value:
        return None
    from apexcli.rewards.registry import canonical_name

    def served(name: Any) -> Any:
        """An objective naming the reward without a server of its own (an explicit @ won)."""
        try:
            same = isinstance(name, str) and "@" not in name and canonical_name(name) == reward
        except ApexError:
            same = False
        return f"{name}@{value}" if same else name

    lists = [key for key in ("objectives", "eval.objectives") if isinstance(get_key(data, key, None), list)]
    for key in lists:
        set_key(data, key, [served(name) for name in get_key(data, key)])
    # with no objectives in this config (a partial file), where the URL applied is unknown
    return None if lists else f"could not be carried over: write {reward}@{value} in objectives"


@dataclass(frozen=True)
class OldKey:
    key: str
    """The dotted key as older versions wrote it."""
    instead: str
    """What to write now, or why the key is gone (ends the one-line error)."""
    carry: Carry
    """Rewrites the old value into today's keys; returns a note when it cannot keep it."""


CONFLICT_RECORD = "docs/experiments/2026-12-01-conflict-on-signs.md"


def _now(new: str) -> str:
    return f"is now '{new}'"


OLD_KEYS: tuple[OldKey, ...] = (
    # research settings moved under their area's experimental section
    OldKey("train.anchor_beta", _now("train.experimental.anchor_beta"), _moved("train.experimental.anchor_beta")),
    OldKey("train.nft_beta", _now("train.experimental.nft_beta"), _moved("train.experimental.nft_beta")),
    OldKey("train.nft_adv_scale", _now("train.experimental.nft_adv_scale"), _moved("train.experimental.nft_adv_scale")),
    OldKey("train.nft_timesteps", _now("train.experimental.nft_timesteps"), _moved("train.experimental.nft_timesteps")),
    OldKey(
        "sampling.noise_block", _now("sampling.experimental.noise_block"), _moved("sampling.experimental.noise_block")
    ),
    OldKey(
        "balance.progress_prompts",
        _now("balance.experimental.progress_prompts"),
        _moved("balance.experimental.progress_prompts"),
    ),
    # research settings that made no measurable difference
    OldKey(
        "balance.not_on_text",
        "was removed: keeping objectives off the prompts that quote text made no measurable "
        f"difference (ocr +0.018 ± 0.026 base stds over 8 seeds, {CONFLICT_RECORD})",
        _removed([]),
    ),
    OldKey(
        "balance.apex.conflict",
        "was removed: the conflict penalty is symmetric (leader_yields changed nothing "
        f"measurable: ocr -0.003 ± 0.025 base stds, {CONFLICT_RECORD})",
        _removed("symmetric"),
    ),
    # two keys that said one thing: one stays
    OldKey(
        "balance.apex.terms",
        "was replaced by the coefficients balance.apex.b_lp, b_cp and b_pn: 0 switches a term off",
        _apex_terms,
    ),
    OldKey(
        "balance.apex.dsan",
        "was replaced by balance.apex.rho: rho=0 turns the DSAN floor off (gdpo's std + eps)",
        _apex_dsan,
    ),
    OldKey(
        "balance.static.eps", "was replaced by balance.eps (null = the strategy's own: 1e-4 for static)", _static_eps
    ),
    OldKey(
        "balance.static.drop_zero_advantage",
        "was replaced by balance.drop_zero_advantage (null = the strategy's default: true for static)",
        _drop_zero("static"),
    ),
    OldKey(
        "balance.pareto.drop_filtered",
        "was replaced by balance.drop_zero_advantage (null = the strategy's default: true for pareto)",
        _drop_zero("pareto"),
    ),
    *(
        OldKey(
            f"rewards.{r}.url",
            f"was removed: serve the reward from a server with {r}@URL in objectives "
            f"(e.g. --objectives {r}@http://127.0.0.1:18086)",
            _reward_url,
        )
        for r in ("pick", "aes", "deqa", "ocr")
    ),
    OldKey(
        "rewards.extra.*.url", "was removed: serve the reward from a server with NAME@URL in objectives", _reward_url
    ),
    OldKey(
        "train.gradient_accumulation",
        "was replaced by train.optimizer_steps_per_epoch (optimizer steps per pass over "
        "a rollout batch: the same split counted from the other end)",
        _gradient_accumulation,
    ),
)


def _flat_keys(data: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, dict):
            keys.extend(_flat_keys(v, key + "."))
    return keys


def _matches(pattern: str, key: str) -> bool:
    """``key`` is ``pattern``, whose ``*`` stands for one key part (``rewards.extra.*.url``)."""
    head, star, tail = pattern.partition("*")
    if not star:
        return key == pattern
    middle = key[len(head) : len(key) - len(tail)]
    return len(key) > len(head) + len(tail) and key.startswith(head) and key.endswith(tail) and "." not in middle


def _present(data: dict) -> list[tuple[OldKey, str]]:
    """(entry, concrete key) for each old key in ``data``, in table order (the order they carry over)."""
    keys = _flat_keys(data)
    return [(entry, key) for entry in OLD_KEYS for key in keys if _matches(entry.key, key)]


def reject_old_keys(data: dict, where: str = "") -> None:
    """A one-line ApexError for the first key of ``data`` that only older versions had."""
    for entry, key in _present(data):
        source = f" ({where})" if where else ""
        raise ApexError(f"config key '{key}'{source} {entry.instead}")


def upgrade_config(data: dict) -> tuple[dict, list[str]]:
    """``data`` (a copy) with every old key rewritten into today's keys, and a note for each old
    value that could not be kept (a removed setting whose value was not its neutral one)."""
    out = copy.deepcopy(data)
    notes: list[str] = []
    for entry, key in _present(out):
        value = pop_key(out, key)
        if value is _MISSING:
            continue
        note = entry.carry(out, value, key)
        if note:
            notes.append(f"{key}={value!r} {note}")
    return out, notes
