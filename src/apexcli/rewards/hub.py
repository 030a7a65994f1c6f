"""Loading weights from a hub id or a local dir, with a one-line fix when they are missing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from apexcli.errors import ApexError

# How the running command takes a reward option: `apex train`, `score` and `serve` all accept
# `--set KEY=VALUE`; a command without overrides (apex eval) installs its own wording.
_OVERRIDE_HINT: ContextVar[str] = ContextVar("override_hint", default="pass --set {option}=DIR")


@contextlib.contextmanager
def override_hint(template: str) -> Iterator[None]:
    """Within the block, missing-weights messages tell the user `template` ({option} = the key)."""
    token = _OVERRIDE_HINT.set(template)
    try:
        yield
    finally:
        _OVERRIDE_HINT.reset(token)


def looks_local(source: str) -> bool:
    """A path rather than a hub id ('org/name')."""
    return os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1 or "\\" in source


def missing_weights_message(what: str, source: str, option: str, reason: str = "") -> str:
    """One line: which model, how to download it, which option points apex at a local copy."""
    why = f" ({reason})" if reason else ""
    fix = _OVERRIDE_HINT.get().format(option=option)
    if looks_local(source) and not os.path.exists(source):
        return f"{what}: local path {source!r} does not exist{why}; {fix}, DIR being a folder holding it"
    return (
        f"cannot load {what} {source!r}{why}: download it with "
        f"`huggingface-cli download {source} --local-dir DIR`, then {fix}"
    )


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()).split(". ")[0]  # first sentence: hub errors run on for lines
    text = type(exc).__name__ + (": " + text if text else "")
    return text if len(text) <= 100 else text[:100].rsplit(" ", 1)[0] + " …"


def load_pretrained(loader: Callable[..., Any], source: str, *, what: str, option: str, **kwargs: Any) -> Any:
    """`loader(source, **kwargs)` (a from_pretrained); missing or unreachable weights -> ApexError."""
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as exc:  # hub errors (offline, 404, gated) are OSError subclasses
        raise ApexError(missing_weights_message(what, source, option, _short(exc))) from None
