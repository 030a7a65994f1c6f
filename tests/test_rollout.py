"""Rollouts on the tiny SD3 pipeline: shapes, determinism, group noise, and ratio == 1 on-policy."""

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.flow.rollout import (
    PromptEmbeds,
    decode_latents,
    initial_noise,
    predict_velocity,
    rollout,
    step_log_prob,
)
from apexcli.flow.sde import gaussian_kl, ode_step
from apexcli.models.tiny import build_tiny_pipeline

STEPS = 5
SIZE = 64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def embeds(pipe):
    @torch.no_grad()
    def enc(prompts):
        e, _, p, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=16
        )
        return PromptEmbeds(e, p)

    return enc(["a red apple", "a blue car", "a cat", 'the word "hi"']), enc([""])


def _run(pipe, cond, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return rollout(
        pipe.transformer,
        pipe.scheduler,
        cond,
        num_steps=STEPS,
        height=SIZE,
        width=SIZE,
        vae_scale_factor=pipe.vae_scale_factor,
        **kw,
    )


def test_trajectory_shapes_and_schedule(pipe, embeds):
    cond, _ = embeds
    traj = _run(pipe, cond)
    assert traj.latents.shape == (4, STEPS + 1, 4, 32, 32) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (4, STEPS) and traj.log_probs.dtype == torch.float32
    assert traj.sigmas.shape == (STEPS + 1,) and traj.sigmas.device.type == "cpu"
    assert traj.sigmas[0].item() == 1.0 and traj.sigmas[-1].item() == 0.0
    assert torch.all(traj.sigmas[1:] < traj.sigmas[:-1])
    assert traj.sigma_max == traj.sigmas[1].item()  # first sigma below 1 (SD3 schedule starts at 1)
    assert traj.sde_mask.tolist() == [True] * STEPS
    assert torch.equal(traj.final, traj.latents[:, -1])
    assert torch.all(traj.log_probs != 0)
    sub = traj[[0, 2]]
    assert torch.equal(sub.latents, traj.latents[[0, 2]]) and torch.equal(sub.log_probs, traj.log_probs[[0, 2]])


def test_same_generator_same_trajectory(pipe, embeds):
    cond, _ = embeds
    a = _run(pipe, cond, generator=torch.Generator().manual_seed(7))
    b = _run(pipe, cond, generator=torch.Generator().manual_seed(7))
    c = _run(pipe, cond, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)


def test_initial_noise_shared_within_groups():
    groups = [0, 0, 1, 1, 1, 2]
    noise = initial_noise(
        6,
        (4, 8, 8),
        generator=torch.Generator().manual_seed(0),
        group_ids=groups,
        share_within_group=True,
        device="cpu",
    )
    assert noise.shape == (6, 4, 8, 8)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[3]) and torch.equal(noise[3], noise[4])
    assert not torch.equal(noise[1], noise[2]) and not torch.equal(noise[4], noise[5])
    private = initial_noise(6, (4, 8, 8), generator=torch.Generator().manual_seed(0), device="cpu")
    assert not torch.equal(private[0], private[1])
    # seeded per group: a group split across two ranks gets the same noise on both
    rank0 = initial_noise(3, (4, 8, 8), group_ids=[0, 0, 1], share_within_group=True, seed=5, device="cpu")
    rank1 = initial_noise(3, (4, 8, 8), group_ids=[1, 2, 2], share_within_group=True, seed=5, device="cpu")
    assert torch.equal(rank0[2], rank1[0]) and not torch.equal(rank0[0], rank1[1])
    with pytest.raises(ValueError):
        initial_noise(3, (4,), group_ids=[0, 1], share_within_group=True, device="cpu")


def test_rollout_starts_from_given_noise(pipe, embeds):
    cond, _ = embeds
    noise = initial_noise(
        4,
        (4, 32, 32),
        generator=torch.Generator().manual_seed(1),
        group_ids=[0, 0, 1, 1],
        share_within_group=True,
        device="cpu",
    )
    traj = _run(pipe, cond[[0, 0, 1, 1]], initial_noise=noise)
    assert torch.equal(traj.latents[:, 0], noise)
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])
    assert not torch.equal(traj.final[0], traj.final[1])  # the SDE noise separates group members


def _recompute(pipe, traj, cond, guidance, uncond):
    out = torch.zeros_like(traj.log_probs)
    for t in range(traj.num_steps):
        if not traj.sde_mask[t]:
            continue
        x, x_next, s, s_next = traj.transition(t)
        out[:, t] = step_log_prob(
            pipe.transformer,
            x,
            x_next,
            s,
            s_next,
            cond,
            guidance_scale=guidance,
            uncond=uncond,
            **traj.step_options,
        ).log_prob
    return out


@pytest.mark.parametrize("sampler", ["sde", "cps"])
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_recomputed_log_probs_match_the_rollout(pipe, embeds, sampler, guidance):
    cond, uncond = embeds
    traj = _run(pipe, cond, sampler=sampler, guidance_scale=guidance, uncond=uncond)
    recomputed = _recompute(pipe, traj, cond, guidance, uncond)
    torch.testing.assert_close(recomputed, traj.log_probs, rtol=0, atol=1e-5)
    # the check can fail: other conditioning moves the mean and the log-prob with it
    shuffled = cond[[1, 2, 3, 0]]
    wrong = _recompute(pipe, traj, shuffled, guidance, uncond)
    assert (wrong - traj.log_probs)[:, traj.sde_mask].abs().max() > 1e-4  # 10x the tolerance


def test_block_noise_rollout_recomputes_and_moves_only_block_directions(pipe, embeds):
    cond, uncond = embeds
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    a = _run(pipe, cond, sde_steps=[1], initial_noise=noise, noise_block=4, generator=torch.Generator().manual_seed(1))
    b = _run(pipe, cond, sde_steps=[1], initial_noise=noise, noise_block=4, generator=torch.Generator().manual_seed(2))
    assert a.noise_block == 4
    torch.testing.assert_close(_recompute(pipe, a, cond, 1.0, None), a.log_probs, rtol=0, atol=1e-5)
    # two rollouts from one noise differ after the stochastic step only by a block-constant image
    gap = a.latents[:, 2] - b.latents[:, 2]
    blocks = torch.nn.functional.avg_pool2d(gap, 4).repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert gap.abs().max() > 1e-2
    torch.testing.assert_close(gap, blocks, rtol=0, atol=1e-5)
    with pytest.raises(ApexError, match="noise_block=3"):
        _run(pipe, cond, noise_block=3)
    with pytest.raises(ApexError, match="sampler=sde"):
        _run(pipe, cond, sampler="cps", noise_block=4)


def test_recompute_with_per_sample_timesteps_and_micro_batches(pipe, embeds):
    cond, uncond = embeds
    traj = _run(pipe, cond, guidance_scale=4.5, uncond=uncond)
    t = torch.tensor([0, 3, 1, 4])  # one training timestep per sample, as the trainer draws them
    rows = torch.arange(4)
    x, x_next = traj.latents[rows, t], traj.latents[rows, t + 1]
    sigma, sigma_next = traj.sigmas[t], traj.sigmas[t + 1]
    kw = dict(guidance_scale=4.5, uncond=uncond, sampler="sde", noise_level=traj.noise_level, sigma_max=traj.sigma_max)
    joint = step_log_prob(pipe.transformer, x, x_next, sigma, sigma_next, cond, **kw)
    torch.testing.assert_close(joint.log_prob, traj.log_probs[rows, t], rtol=0, atol=1e-5)
    for i in range(4):  # micro-batches of one
        one = step_log_prob(
            pipe.transformer, x[i : i + 1], x_next[i : i + 1], sigma[i : i + 1], sigma_next[i : i + 1], cond[i], **kw
        )
        torch.testing.assert_close(one.log_prob, traj.log_probs[i : i + 1, t[i]], rtol=0, atol=1e-5)
    # with grad: the log-prob is differentiable in the transformer's weights
    out = step_log_prob(pipe.transformer, x, x_next, sigma, sigma_next, cond, **kw)
    out.log_prob.sum().backward()
    grads = [p.grad for p in pipe.transformer.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    pipe.transformer.zero_grad(set_to_none=True)
    # the same model as reference: KL exactly 0
    with torch.no_grad():
        ref = step_log_prob(pipe.transformer, x, x_next, sigma, sigma_next, cond, **kw)
    assert torch.all(gaussian_kl(out.mean.detach(), ref.mean, out.std) == 0)


def test_sde_window_is_deterministic_outside(pipe, embeds):
    cond, _ = embeds
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    a = _run(pipe, cond, sde_steps=[1, 2], initial_noise=noise, generator=torch.Generator().manual_seed(1))
    b = _run(pipe, cond, sde_steps=[1, 2], initial_noise=noise, generator=torch.Generator().manual_seed(2))
    assert a.sde_mask.tolist() == [False, True, True, False, False]
    assert torch.all(a.log_probs[:, [0, 3, 4]] == 0) and torch.all(a.log_probs[:, [1, 2]] != 0)
    assert torch.equal(a.latents[:, :2], b.latents[:, :2])  # step 0 is an ODE step
    assert not torch.equal(a.latents[:, 2], b.latents[:, 2])
    for t in (0, 3, 4):  # outside the window: exactly the Euler step
        x, x_next, s, s_next = a.transition(t)
        v = predict_velocity(pipe.transformer, x, s, cond)
        torch.testing.assert_close(x_next, ode_step(v, x, s, s_next), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sde_steps"):
        _run(pipe, cond, sde_steps=[STEPS])


def test_ode_sampler_and_cps_last_step(pipe, embeds):
    cond, _ = embeds
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    a = _run(pipe, cond, sampler="ode", initial_noise=noise, generator=torch.Generator().manual_seed(1))
    b = _run(pipe, cond, sampler="ode", initial_noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.latents, b.latents) and not a.sde_mask.any() and torch.all(a.log_probs == 0)
    cps = _run(pipe, cond, sampler="cps")
    assert cps.sde_mask.tolist() == [True] * (STEPS - 1) + [False]  # CPS onto sigma 0 has zero std
    with pytest.raises(ApexError, match="sampler"):
        _run(pipe, cond, sampler="ddim")


def test_cfg_is_one_batched_forward(pipe, embeds):
    cond, uncond = embeds
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        x = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        v = predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.0, uncond=uncond)
        assert calls == [8]
        v_c = predict_velocity(pipe.transformer, x, 0.7, cond)
        v_u = predict_velocity(pipe.transformer, x, 0.7, uncond.expand(4))
        assert calls == [8, 4, 4]
    finally:
        hook.remove()
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u), rtol=0, atol=1e-5)
    assert (v_c - v_u).abs().max() > 1e-3  # conditioning matters, so the check above has teeth
    with pytest.raises(ValueError, match="unconditional"):
        predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.0)


def test_decode_latents(pipe, embeds):
    cond, _ = embeds
    traj = _run(pipe, cond, sampler="ode")
    images = decode_latents(pipe.vae, traj.final, batch_size=3)
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    cfg = pipe.vae.config
    with torch.no_grad():
        manual = pipe.vae.decode(traj.final / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
    torch.testing.assert_close(images, (manual / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_bad_resolution_is_a_user_error(pipe, embeds):
    cond, _ = embeds
    with pytest.raises(ApexError, match="multiple of 4"):
        rollout(pipe.transformer, pipe.scheduler, cond, num_steps=2, height=66, width=64, vae_scale_factor=2)
