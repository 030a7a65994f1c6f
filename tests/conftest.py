"""Fixtures shared by the test modules, and the settings every test runs under (offline hub,
one intra-op thread). Helpers to import live in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import train_tiny  # importing helpers applies the settings (offline hub, one thread)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 3-step tiny run (brightness + colorfulness), shared read-only by several tests."""
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    return train_tiny(out, 3, "--objectives", "brightness,colorfulness")


@pytest.fixture(scope="module")
def rapidocr():
    """The real OCR reward (RapidOCR ships its models: offline), one engine per test module."""
    from apexcli.rewards import OcrConfig
    from apexcli.rewards.ocr import OcrReward

    reward = OcrReward(OcrConfig(backend="rapidocr", workers=2))
    yield reward
    reward.close()


@pytest.fixture(scope="session")
def towers(tmp_path_factory) -> list[str]:
    """Reward overrides pointing pick and aes at real-width towers (PickScore's CLIP-H, the
    aesthetic CLIP-L + LAION MLP; one layer deep) saved in a temp dir: the real-shape runs' rewards."""
    from apexcli.models.real_shape import save_real_shape_aesthetic, save_real_shape_pickscore

    root = tmp_path_factory.mktemp("towers")
    pick = save_real_shape_pickscore(root / "pick")
    clip, head = save_real_shape_aesthetic(root / "aes")
    return [
        f"rewards.pick.source={pick}",
        f"rewards.pick.processor_source={pick}",
        f"rewards.aes.clip_source={clip}",
        f"rewards.aes.head_source={head}",
    ]
