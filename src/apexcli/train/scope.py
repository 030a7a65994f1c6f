"""Which objectives train on which prompts: ``balance.not_on_text``.

Quoting text is a property of the prompt (``prompts.quotes_text``), the same test by which the
OCR reward decides where it applies; no reward is named here."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from apexcli.errors import ApexError
from apexcli.prompts import quotes_text


def not_on_text_mask(prompts: Sequence[str], objectives: Sequence[str], names: Sequence[str]) -> torch.Tensor | None:
    """[P, K] bool, True where objective k is not trained on prompt p (p quotes text, k in ``names``).

    None when ``names`` is empty. A name that is not an objective is an error, so a typo does not
    silently train everything everywhere.
    """
    if not names:
        return None
    unknown = [n for n in names if n not in objectives]
    if unknown:
        raise ApexError(
            f"balance.not_on_text names {', '.join(repr(n) for n in unknown)}, not among the objectives "
            f"({', '.join(objectives)}); list only objectives being trained"
        )
    quotes = torch.tensor([quotes_text(p) for p in prompts], dtype=torch.bool)
    scoped = torch.tensor([k in names for k in objectives], dtype=torch.bool)
    return quotes.unsqueeze(1) & scoped.unsqueeze(0)
