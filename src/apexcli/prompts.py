"""Prompt sets: a .txt file (one prompt per line), a .jsonl file ({"prompt": ...} per line), or a
set that ships with apex (``builtin:general``, ``builtin:eval``, ``builtin:ocr``, ``builtin:ocr_eval``;
``builtin:mixed`` = general + ocr, for the four-objective recipe; ``builtin:mini`` and
``builtin:mini_eval`` for the mini world, and their halves ``builtin:mini_signs``,
``builtin:mini_shapes``, ``builtin:mini_signs_eval``, ``builtin:mini_shapes_eval`` for the
single-objective runs of ocr and adherence; ``builtin:mini_eval_large`` (320 held-out prompts, the
first 64 are ``mini_eval``) and its halves ``builtin:mini_signs_eval_large``,
``builtin:mini_shapes_eval_large``, to measure gains smaller than ``mini_eval`` can resolve)."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

from apexcli.errors import ApexError

_COMBINED = {"mixed": ["general", "ocr"], "mixed_eval": ["eval", "ocr_eval"]}
_CURLY = re.compile(r"“([^”]*)”")


def quoted_text(prompt: str) -> str:
    """The text a prompt asks to be written, '' when it quotes nothing.

    Straight quotes first, exactly as Flow-GRPO's OCR reward reads them (``prompt.split('"')[1]``:
    the text after the first ``"``, up to the next ``"`` or the end); a curly “…” span only when
    there is no ``"``."""
    prompt = prompt or ""
    if '"' in prompt:
        return prompt.split('"')[1]
    match = _CURLY.search(prompt)
    return match.group(1) if match else ""


def quotes_text(prompt: str) -> bool:
    """Whether the prompt asks for visible text (quoted whitespace alone does not count)."""
    return bool(quoted_text(prompt).split())


def builtin_names() -> list[str]:
    files = resources.files("apexcli.data")
    return sorted([p.name[:-4] for p in files.iterdir() if p.name.endswith(".txt")] + list(_COMBINED))


def _read_builtin(name: str) -> list[str]:
    if name in _COMBINED:
        return [p for part in _COMBINED[name] for p in _read_builtin(part)]
    path = resources.files("apexcli.data") / f"{name}.txt"
    if not path.is_file():
        raise ApexError(
            f"unknown prompt set 'builtin:{name}'; valid: {', '.join('builtin:' + n for n in builtin_names())}"
        )
    return _lines(path.read_text(encoding="utf-8"))


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_prompts(spec: str) -> list[str]:
    """Prompts from a spec (see module docstring). Raises ApexError for a missing or empty set."""
    if spec.startswith("builtin:"):
        prompts = _read_builtin(spec[len("builtin:") :])
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            raise ApexError(f"prompt file '{spec}' is a directory (give a .txt, a .jsonl or builtin:NAME)")
        if not path.is_file():
            raise ApexError(f"prompt file '{spec}' does not exist (give a .txt, a .jsonl or builtin:NAME)")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ApexError(
                f"prompt file '{spec}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} on line {line}); save it as UTF-8"
            ) from None
        if path.suffix == ".jsonl":
            prompts = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise ApexError(f"prompt file '{spec}' line {n} is not JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise ApexError(f"prompt file '{spec}' line {n} has no string 'prompt' field")
                prompts.append(row["prompt"])
        else:
            prompts = _lines(text)
    if not prompts:
        raise ApexError(f"prompt set '{spec}' is empty")
    return prompts
