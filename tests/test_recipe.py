"""The Flow-GRPO training recipe: KL form, CPS log-prob form, off-policy updates,
static = multi_score, EMA schedule, LoRA init and the presets that claim the recipe.

Each reference formula below is written out from Flow-GRPO's equations (train_sd3.py,
stat_tracking.py, ema.py), independently of our implementation, and compared on the same inputs.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.balance import build_balancer
from apexcli.config import Config, resolve_config
from apexcli.errors import ApexError
from apexcli.flow.rollout import _scheduler_sigmas, first_sigma_below_one
from apexcli.flow.sde import STEP_FUNCTIONS, sde_step_with_logprob
from apexcli.models.lora import attach_lora
from apexcli.models.tiny import build_tiny_pipeline
from apexcli.train.ema import LoraEMA
from apexcli.train.loss import step_kl
from apexcli.train.trainer import Trainer
from helpers import read_metrics, train_tiny


def sd35m_sigmas() -> torch.Tensor:
    """SD3.5-M's rollout schedule: 10 steps, FlowMatchEulerDiscreteScheduler(shift=3)."""
    return _scheduler_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, (64, 64), 2)


# ----------------------------------------------------------------------------- 1. KL form
def test_reference_kl_is_flow_grpos_formula_on_the_sd35m_schedule():
    sig = sd35m_sigmas()
    smax = first_sigma_below_one(sig)
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for t in range(9):  # the trained steps: all but the last
        x, v = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
        v_ref = v + 0.1 * torch.randn(2, 16, 8, 8, generator=gen)
        s, s_next = float(sig[t]), float(sig[t + 1])
        out = sde_step_with_logprob(v, x, s, s_next, noise_level=0.7, sigma_max=smax, generator=gen)
        ref = sde_step_with_logprob(v_ref, x, s, s_next, noise_level=0.7, sigma_max=smax, prev_sample=out.prev_sample)
        # Flow-GRPO: mean over dims of (mean - mean_ref)^2, divided by 2 sig_t^2,
        # sig_t = a sqrt(s / (1 - s)) with 1 - sigma_max in the denominator at s == 1
        sig_t = 0.7 * math.sqrt(s / (1 - (smax if s >= 1 else s)))
        expected = ((out.mean - ref.mean) ** 2).mean(dim=(1, 2, 3)) / (2 * sig_t**2)
        torch.testing.assert_close(step_kl(out, ref, "reference"), expected, rtol=1e-5, atol=0)
        exact = step_kl(out, ref, "exact")
        ratios.append((exact / step_kl(out, ref, "reference")).mean().item())
        assert ratios[-1] == pytest.approx(1 / (s - s_next), rel=1e-4)  # the exact KL is 1/|dt| larger
    # the numbers quoted in docs/method/flow-grpo-parity.md: 25x at step 0, 3.7x at step 8, 13x on average
    assert ratios[0] == pytest.approx(25.1, abs=0.05) and ratios[-1] == pytest.approx(3.72, abs=0.01)
    assert sum(ratios) / len(ratios) == pytest.approx(13.0, abs=0.05)
    with pytest.raises(ValueError, match="KL form"):
        step_kl(out, ref, "loose")


# ----------------------------------------------------------------------------- 2. CPS log-prob
def _velocity_gradient_shares(sampler: str) -> list[float]:
    """Share of each trained step in the summed norm of d(log-prob)/d(velocity), sd35m schedule."""
    sig = sd35m_sigmas()
    gen = torch.Generator().manual_seed(1)
    norms = []
    for t in range(9):
        x = torch.randn(4, 16, 8, 8, generator=gen)
        v = torch.randn(4, 16, 8, 8, generator=gen).requires_grad_()
        s, s_next = float(sig[t]), float(sig[t + 1])
        with torch.no_grad():
            sample = STEP_FUNCTIONS[sampler](v, x, s, s_next, noise_level=0.7, generator=gen).prev_sample
        log_prob = STEP_FUNCTIONS[sampler](v, x, s, s_next, noise_level=0.7, prev_sample=sample).log_prob
        (grad,) = torch.autograd.grad(log_prob.sum(), v)
        norms.append(grad.norm().item())
    return [n / sum(norms) for n in norms]


def test_cps_default_form_lets_no_step_dominate_the_gradient():
    full = _velocity_gradient_shares("cps_gaussian")
    assert full[-1] > 0.9  # the full density: 1/(2 std^2) with std ~0.006 at the last step
    ours = _velocity_gradient_shares("cps")
    assert max(ours) < 0.25 and ours[-1] < 0.01  # Flow-GRPO's -(x'-mean)^2


# ----------------------------------------------------------------------------- 3. off-policy updates
def test_two_optimizer_steps_per_epoch_make_the_second_half_off_policy(tmp_path):
    """4 samples in 2 micro-batches: with 2 optimizer steps the second micro-batch is scored by an
    updated policy, so its ratios leave [1 - eps, 1 + eps]; with 1 step every ratio stays 1."""
    # (one optimizer step keeps every ratio at 1: test_trainer.py::test_first_update_is_on_policy)
    off = read_metrics(
        train_tiny(tmp_path / "two", 1, "train.checkpoint_every=0", "train.optimizer_steps_per_epoch=2")
    )[0]
    assert off["optimizer_steps"] == 2
    assert abs(off["ratio_first"] - 1) < 1e-5  # the first micro-batch is still on-policy
    assert off["ratio_max_dev"] > 1e-4  # later ones are not: beyond the clip range 1e-4
    assert off["clip_frac"] > 0
    with pytest.raises(ApexError, match="'train.optimizer_steps_per_epoch' must be >= 1"):
        resolve_config(preset="tiny", overrides=["train.optimizer_steps_per_epoch=0"])


# ----------------------------------------------------------------------------- 4. static advantages
def flow_grpo_advantages(total: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per-prompt GRPO advantages with the batch std, as Flow-GRPO's SD3 configs set them
    (global_std=True): (R - mean of R's group) / (population std of every R + 1e-4)."""
    std = total.std(unbiased=False) + 1e-4
    adv = torch.empty_like(total)
    for g in groups.unique():
        members = groups == g
        adv[members] = (total[members] - total[members].mean()) / std
    return adv


def test_static_default_is_flow_grpos_multi_score():
    # pick (raw PickScore units), aes, and a near-flat group 1 and an exactly flat group 2 on both
    r = torch.tensor(
        [
            [21.0, 5.1],
            [22.5, 5.9],
            [23.0, 6.2],
            [21.8, 5.5],  # group 0: ordinary spread
            [22.0, 5.50],
            [22.0, 5.50],
            [22.0, 5.50],
            [22.0, 5.51],  # group 1: one aes value differs by 0.01
            [20.0, 4.0],
            [20.0, 4.0],
            [20.0, 4.0],
            [20.0, 4.0],
        ],  # group 2: flat
        dtype=torch.float64,
    )
    g = torch.arange(3).repeat_interleave(4)
    weights = [0.5, 0.5]
    balancer = build_balancer("static", ["pick", "aes"], weights=weights)
    adv, info = balancer(r, g)
    # multi_score on Flow-GRPO's scales: PickScore / 26, aesthetic raw; weights as given
    total = 0.5 * r[:, 0] / 26 + 0.5 * r[:, 1]
    expected = flow_grpo_advantages(total, g)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[8:], torch.zeros(4))  # the flat group: exactly 0, so it is dropped
    assert balancer.drops_zero_advantage
    # the near-flat group stays small (its 0.01 aes step over the batch spread), where the
    # group-std form blows it up to unit size
    assert adv[4:8].abs().max() < 0.02
    group_std, _ = build_balancer(
        "static", ["pick", "aes"], weights=weights, std_scope="group", eps=1e-6, static={"reference_scales": False}
    )(r, g)
    assert group_std[4:8].abs().max() > 1.5


def test_static_reference_scales_stop_pickscore_from_hijacking():
    """PickScore's raw spread (~1 point) dwarfs aes's (~0.3) and deqa's; /26 and /5 restore the balance."""
    gen = torch.Generator().manual_seed(0)
    n = 64
    r = torch.stack(
        [
            22 + 1.0 * torch.randn(n, generator=gen),
            4 + 0.3 * torch.randn(n, generator=gen),
            5.5 + 0.3 * torch.randn(n, generator=gen),
        ],
        1,
    ).double()
    g = torch.arange(8).repeat_interleave(8)
    names, weights = ["pick", "deqa", "aes"], [0.5, 0.2, 0.3]
    _, raw = build_balancer("static", names, weights=weights, static={"reference_scales": False})(r, g)
    _, scaled = build_balancer("static", names, weights=weights)(r, g)
    assert raw["metrics"]["balance/share/pick"] > 0.75
    assert scaled["metrics"]["balance/share/pick"] < 0.1
    assert build_balancer("static", names).training_scales().tolist() == pytest.approx([1 / 26, 1 / 5, 1.0])


def test_zero_advantage_samples_are_dropped_and_padded_to_whole_micro_batches():
    def selected(adv, drop, micro):
        fake = SimpleNamespace(
            balancer=SimpleNamespace(drops_zero_advantage=drop),
            accelerator=SimpleNamespace(num_processes=1, process_index=0),
            cfg=SimpleNamespace(seed=0),
            step=3,
        )
        return Trainer._selected_samples(fake, torch.tensor(adv), micro).tolist()

    adv = [0.5, 0.0, 0.0, -0.5, 1.0, 0.0, 0.0, 0.0]
    assert selected(adv, False, 2) == list(range(8))
    kept = selected(adv, True, 2)  # 3 nonzero -> 2 micro-batches: one zero-advantage sample pads
    assert len(kept) == 4 and kept[:3] == [0, 3, 4] and adv[kept[3]] == 0.0
    assert selected(adv, True, 1) == [0, 3, 4]
    assert selected([0.0] * 4, True, 2) == []


def test_static_training_leaves_zero_advantage_samples_out(tmp_path):
    """The trainer's update with static's default trains only A != 0 samples (whole micro-batches)."""
    from apexcli.train.sampler import plan_step
    from helpers import TINY_OVERRIDES

    cfg = resolve_config(
        preset="tiny",
        options={"out": str(tmp_path / "run"), "objectives": ["brightness", "contrast"]},
        overrides=[*TINY_OVERRIDES, "balance.strategy=static"],
    )
    trainer = Trainer(cfg, argv=["test"])
    try:
        trainer.setup()
        trainer.step = 1
        plan = plan_step(
            step=1,
            seed=cfg.seed,
            num_prompts=len(trainer.prompts),
            prompts_per_step=2,
            group_size=2,
            rank=0,
            world_size=1,
        )
        trajectories, _, _ = trainer._sample(plan)
        ids = list(plan.prompt_ids)
        before = [p.detach().clone() for p in trainer.lora_params]
        flat = trainer._update(trajectories, torch.zeros(4), ids)  # every group flat: nothing to train
        assert flat["optimizer_steps"] == 0 and flat["samples_trained"] == 0
        assert all(torch.equal(a, p) for a, p in zip(before, trainer.lora_params))
        half = trainer._update(trajectories, torch.tensor([0.5, -0.5, 0.0, 0.0]), ids)
        assert half["samples_trained"] == 2 and half["optimizer_steps"] == 1  # one micro-batch of 2
        assert any(not torch.equal(a, p) for a, p in zip(before, trainer.lora_params))
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- 6. EMA, LoRA init
def test_ema_every_8_steps_with_flow_grpos_warmup():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = LoraEMA([p], 0.9, every=8, warmup=True)
    expected = 0.0
    for n in range(1, 41):
        p.data.fill_(float(n))  # the policy after optimizer step n
        ema.update()
        if n % 8 == 0:
            d = min(0.9, (1 + n) / (10 + n))  # 0.5 at n = 8 ... 0.9 from n = 80 on
            expected = d * expected + (1 - d) * n
        assert ema.shadow[0].item() == pytest.approx(expected, rel=1e-6)
    # by hand: 4 (n=8, d=1/2), 8.1538 (17/26), 12.3484 (25/34), 16.5594 (33/42), 20.7787 (41/50)
    assert ema.shadow[0].item() == pytest.approx(20.7787, abs=1e-3)
    state = ema.state_dict()
    again = LoraEMA([p], 0.9, every=8, warmup=True)
    again.load_state_dict(state)
    assert again.steps == 40 and again.current_decay() == pytest.approx(41 / 50)
    p.data.fill_(0.0)
    plain = LoraEMA([p], 0.9)
    p.data.fill_(10.0)
    plain.update()  # every step, constant decay: 0.1 of the way to p
    assert plain.shadow[0].item() == pytest.approx(1.0)


def test_lora_gaussian_init_has_std_one_over_rank():
    def a_std(init: str) -> float:
        transformer = build_tiny_pipeline().transformer
        params = attach_lora(
            transformer,
            rank=4,
            alpha=8,
            dropout=0.0,
            seed=0,
            init=init,
            target_modules=list(JOINT_ATTENTION_PROJECTIONS),
        )
        a = torch.cat([w.flatten() for n, w in transformer.named_parameters() if "lora_A" in n])
        b = torch.cat([w.flatten() for n, w in transformer.named_parameters() if "lora_B" in n])
        assert len(params) > 0 and torch.count_nonzero(b) == 0  # the policy starts at the base model
        return a.std().item()

    assert a_std("gaussian") == pytest.approx(1 / 4, rel=0.1)
    assert a_std("kaiming") < 0.2  # Kaiming-uniform: 1/sqrt(3 fan_in) = 0.10 at the tiny width 32
    with pytest.raises(ApexError, match="lora.init"):
        resolve_config(preset="tiny", overrides=["lora.init=orthogonal"])


# ----------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", ["sd35m", "sd35m-1gpu", "sd35l"])
def test_reference_presets_use_the_reference_recipe(preset):
    cfg = resolve_config(preset=preset)
    assert cfg.train.kl_form == "reference" and cfg.train.kl_beta == 0.04
    assert cfg.train.optimizer_steps_per_epoch == 2 and cfg.train.timestep_fraction == 0.99
    assert cfg.lora.init == "gaussian" and cfg.model.max_sequence_length == 128
    assert cfg.train.ema_decay == 0.9 and cfg.train.ema_every == 8 and cfg.train.ema_warmup
    assert cfg.sampling.guidance_scale == 4.5 and cfg.eval.guidance_scale == 4.5


def test_tiny_preset_keeps_its_behaviour():
    cfg = resolve_config(preset="tiny")
    assert cfg.train.kl_form == "exact" and cfg.train.optimizer_steps_per_epoch == 1
    assert cfg.lora.init == "kaiming" and cfg.train.ema_decay == 0
    assert cfg.train.ema_every == 1 and not cfg.train.ema_warmup  # a test that turns the EMA on sees it move


def test_the_recipe_is_the_default():
    """A config that names no preset trains the Flow-GRPO recipe; sd35m adds nothing to it."""
    default, sd35m = Config(), resolve_config(preset="sd35m")
    assert default.train.kl_form == "reference" and default.train.optimizer_steps_per_epoch == 2
    assert default.lora.init == "gaussian" and default.model.max_sequence_length == 128
    assert (default.train.ema_decay, default.train.ema_every, default.train.ema_warmup) == (0.9, 8, True)
    assert (default.train.group_size, default.train.prompts_per_step, default.train.timestep_fraction) == (24, 48, 0.99)
    for section in ("model", "lora", "sampling", "train", "balance", "rewards", "prompts", "eval"):
        assert getattr(sd35m, section) == getattr(default, section), section
