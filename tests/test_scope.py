"""balance.not_on_text: objectives that sit out the prompts quoting text."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_OVERRIDES

from apexcli.config import resolve_config
from apexcli.errors import ApexError
from apexcli.train.sampler import plan_step
from apexcli.train.scope import not_on_text_mask
from apexcli.train.trainer import Trainer

SHAPE = "a red circle on white"
SIGN = 'a sign that says "CAT"'


def test_mask_marks_the_named_objectives_on_quoting_prompts_only():
    mask = not_on_text_mask([SHAPE, SIGN], ["adherence", "quality", "ocr"], ["quality"])
    assert mask.tolist() == [[False, False, False], [False, True, False]]
    assert not_on_text_mask([SHAPE, SIGN], ["quality"], []) is None
    with pytest.raises(ApexError, match="balance.not_on_text names 'qualty'"):
        not_on_text_mask([SHAPE], ["quality", "ocr"], ["qualty"])


def test_trainer_masks_the_objective_on_signs_and_trains_it_elsewhere(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{SHAPE}\n{SIGN}\n")
    options = {"out": str(tmp_path / "run"), "objectives": ["brightness", "colorfulness"]}
    overrides = [*TINY_OVERRIDES, f"prompts.train={prompts}", "balance.not_on_text=[brightness]", "train.prompts_per_step=2"]
    trainer = Trainer(resolve_config(preset="tiny", options=options, overrides=overrides), argv=["test"])
    try:
        trainer.setup()
        seen = []
        for _ in range(3):
            trainer.step += 1  # as the training loop does before each step
            plan = plan_step(step=trainer.step, seed=trainer.cfg.seed, num_prompts=2, prompts_per_step=2,
                             group_size=2, rank=0, world_size=1)
            on_sign = torch.tensor([i == 1 for i in plan.prompt_ids], dtype=torch.float64).mean().item()
            row = trainer.train_step()
            # brightness is masked exactly on the sign's samples; colorfulness nowhere
            assert row["balance/nan_frac/brightness"] == pytest.approx(on_sign)
            assert row["balance/nan_frac/colorfulness"] == 0.0
            seen.append(on_sign)
        assert any(f > 0 for f in seen)  # the draw put the sign in some step
    finally:
        trainer.close()
