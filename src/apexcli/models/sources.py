"""Where a pipeline's weights come from, decided without importing diffusers: the ``doctor``
checks and ``load_pipeline`` must read ``model.pretrained`` the same way."""

from __future__ import annotations

from pathlib import Path

MINI_DIR = Path(__file__).resolve().parent / "mini"  # written by `python -m apexcli.tools.mini_pretrain`
BUILT_IN = ("tiny", "tiny-flux")
"""``model.pretrained`` names of the random-weight pipelines built in code (SD3 and FLUX.1)."""


def looks_like_path(name: str) -> bool:
    """A local directory rather than a hub id ('org/name')."""
    return name.startswith(("/", ".", "~")) or Path(name).exists() or name.count("/") > 1
