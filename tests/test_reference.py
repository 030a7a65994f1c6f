"""The configuration reference (docs/guide/configuration.md) is generated from the config
dataclasses; a field added, renamed or re-documented without `make docs` fails here."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from apexcli import reference
from apexcli.config import Config
from apexcli.schema import iter_fields, setting

PAGE = Path(__file__).resolve().parent.parent / "docs" / "guide" / "configuration.md"


def test_committed_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == reference.render(), (
        "docs/guide/configuration.md is stale: run `make docs` "
        "(python -m apexcli.reference --out docs/guide/configuration.md) and commit it"
    )


def test_every_key_is_listed_and_documented():
    rows = {r.key: r for s in reference.sections() for r in s.rows}
    # a mapping field (rewards.extra) is one row; iter_fields walks into its entries instead
    mappings = {"rewards.extra"}
    keys = [key for key, _, _ in iter_fields(Config()) if not any(key.startswith(m + ".") for m in mappings)]
    assert sorted(rows) == sorted([*keys, *mappings])
    undocumented = [k for k, r in rows.items() if not r.doc]
    assert not undocumented, f"config keys without a docstring or comment: {undocumented}"


def test_docs_from_docstrings_comments_and_rules():
    rows = {r.key: r for s in reference.sections() for r in s.rows}
    assert rows["train.lr"].doc.startswith("AdamW learning rate.")  # the docstring under the field
    assert "Must be > 0." in rows["train.lr"].doc  # its setting(gt=0)
    assert "Kept on resume." in rows["lora.rank"].doc  # resume="refuse"
    assert "One of `grpo`, `nft`." in rows["train.loss"].doc
    assert rows["rewards.pick.batch_size"].doc == "images per forward pass. Must be >= 1."  # a trailing comment
    assert "upside down" in rows["rewards.ocr.upside_down"].doc  # comment lines above the field
    assert rows["train.lr"].default == "0.0003" and rows["objectives"].default == "[pick, deqa, aes, ocr]"


@dataclasses.dataclass
class _Knobs:
    probe: bool = False
    """A research knob."""


@dataclasses.dataclass
class _Section:
    stable: int = setting(1, ge=0)
    """A supported key."""
    flagged: float = dataclasses.field(default=0.5, metadata={"experimental": True})
    """Marked in its metadata."""
    experimental: _Knobs = dataclasses.field(default_factory=_Knobs)


@dataclasses.dataclass
class _Root:
    train: _Section = dataclasses.field(default_factory=_Section)


def test_experimental_sections_and_fields_are_labelled():
    text = reference.render(_Root)
    assert "## `train.experimental` (experimental)" in text
    assert "| `train.experimental.probe` | `bool` | `false` | A research knob. |" in text
    assert "| `train.flagged` | `float` | `0.5` | *Experimental.* Marked in its metadata. |" in text
    assert "| `train.stable` | `int` | `1` | A supported key. Must be >= 0. |" in text
