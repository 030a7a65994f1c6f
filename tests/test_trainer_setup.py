"""Set-up checks of the trainer and the attention-kernel switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apexcli.config import resolve_config
from apexcli.errors import ApexError
from apexcli.models.loading import attention_kernels
from apexcli.train import run_training


def test_ocr_without_quoted_prompts_is_one_clear_error(tmp_path):
    with pytest.raises(ApexError, match=r"objective 'ocr' needs prompts with quoted text.*builtin:mixed"):
        run_training(preset="tiny", options={"objectives": ["ocr"], "out": str(tmp_path / "r")}, argv=["t"])


def test_presets_for_the_four_objectives_train_on_prompts_with_quoted_text():
    from apexcli.prompts import load_prompts
    from apexcli.rewards.ocr import ocr_target

    for preset in ("sd35m", "sd35m-1gpu", "sd35l"):
        cfg = resolve_config(preset=preset)
        assert "ocr" in cfg.objectives
        assert any(ocr_target(p) for p in load_prompts(cfg.prompts.train))
        assert any(ocr_target(p) for p in load_prompts(cfg.prompts.eval))


def test_attention_switch_restricts_the_sdpa_kernel():
    q = torch.randn(1, 2, 8, 4)
    with attention_kernels("math"):
        out = F.scaled_dot_product_attention(q, q, q)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, q, q), atol=1e-6)
    with pytest.raises(RuntimeError), attention_kernels("cudnn"):  # no cuDNN kernel on a CPU: the switch binds
        F.scaled_dot_product_attention(q, q, q)
    with pytest.raises(ApexError, match="model.attention"):
        resolve_config(preset="tiny", overrides=["model.attention=fast"])


def test_scoring_busy_time_counts_queued_jobs_from_the_previous_end():
    from apexcli.train.trainer import _busy_seconds

    # job 1 runs 0..3; job 2, submitted at 1, waits and runs 3..5; job 3, submitted at 7, runs 7..8
    assert _busy_seconds([0.0, 1.0, 7.0], [3.0, 5.0, 8.0]) == 6.0
