"""Step math of flow/sde.py against torch.distributions and hand-computed values."""

import math

import pytest
import torch

from apexcli.flow.sde import (
    STEP_FUNCTIONS,
    cps_step_with_logprob,
    gaussian_kl,
    ode_step,
    sde_step_with_logprob,
)

# A two-element latent used for the hand computations: x = [1, 2], v = [0.5, -1] (batch 1).
X = torch.tensor([[1.0, 2.0]])
V = torch.tensor([[0.5, -1.0]])
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _normal_logp(sample, mean, std):
    dims = tuple(range(1, sample.ndim))
    return torch.distributions.Normal(mean, std).log_prob(sample).mean(dims)


@pytest.mark.parametrize("step", [sde_step_with_logprob, STEP_FUNCTIONS["cps_gaussian"]])
def test_log_prob_equals_torch_normal_on_random_tensors(step):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    v = torch.randn(3, 4, 8, 8, generator=g)
    out = step(v, x, 0.7, 0.55, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    expected = _normal_logp(out.prev_sample, out.mean, out.std.expand_as(out.mean))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-6, atol=1e-6)
    # the sample really is drawn around the mean with that std
    z = (out.prev_sample - out.mean) / out.std
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.05


def test_sde_step_hand_values():
    # s = 0.5, s' = 0.25, a = 0.5: sig_t = 0.5*sqrt(0.5/0.5) = 0.5, sig_t^2/(2s) = 0.25,
    # x + (1-s)v = [1.25, 1.5], bracket = v + 0.25*[1.25, 1.5] = [0.8125, -0.625],
    # mean = x - 0.25*bracket = [0.796875, 2.15625], std = 0.5*sqrt(0.25) = 0.25.
    mean = torch.tensor([[0.796875, 2.15625]])
    x_next = mean + 0.25 * torch.tensor([[1.0, -2.0]])  # noise [1, -2]
    out = sde_step_with_logprob(V, X, 0.5, 0.25, noise_level=0.5, prev_sample=x_next)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std.reshape(()), torch.tensor(0.25))
    assert torch.equal(out.prev_sample, x_next)  # no noise drawn when the sample is given
    # logp = mean(-n^2/2) - log 0.25 - log sqrt(2 pi) = -1.25 + 1.386294 - 0.918939
    torch.testing.assert_close(out.log_prob, torch.tensor([-0.7826442]))


def test_sde_step_from_sigma_one_uses_sigma_max_in_the_denominator():
    # s = 1, s' = 0.8, sigma_max = 0.8, a = 0.7: sig_t = 0.7*sqrt(1/0.2), sig_t^2 = 2.45,
    # std = sig_t*sqrt(0.2) = 0.7; mean = x + (v + 1.225*x)*(-0.2) = [0.655, 1.71].
    out = sde_step_with_logprob(V, X, 1.0, 0.8, noise_level=0.7, sigma_max=0.8, prev_sample=X)
    torch.testing.assert_close(out.mean, torch.tensor([[0.655, 1.71]]))
    torch.testing.assert_close(out.std.reshape(()), torch.tensor(0.7))
    with pytest.raises(ValueError, match="sigma_max"):
        sde_step_with_logprob(V, X, 1.0, 0.8)
    # sigma_max only matters at s == 1
    a = sde_step_with_logprob(V, X, 0.5, 0.25, noise_level=0.5, sigma_max=0.8, prev_sample=X)
    b = sde_step_with_logprob(V, X, 0.5, 0.25, noise_level=0.5, prev_sample=X)
    torch.testing.assert_close(a.mean, b.mean)


@pytest.mark.parametrize("step", [sde_step_with_logprob, cps_step_with_logprob])
def test_per_sample_sigmas_broadcast_like_separate_calls(step):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 4, 4, generator=g)
    v = torch.randn(3, 2, 4, 4, generator=g)
    x_next = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([1.0, 0.6, 0.3])
    sigma_next = torch.tensor([0.9, 0.4, 0.0])
    joint = step(v, x, sigma, sigma_next, noise_level=0.7, sigma_max=0.9, prev_sample=x_next)
    for i in range(3):
        one = step(
            v[i : i + 1],
            x[i : i + 1],
            float(sigma[i]),
            float(sigma_next[i]),
            noise_level=0.7,
            sigma_max=0.9,
            prev_sample=x_next[i : i + 1],
        )
        torch.testing.assert_close(joint.mean[i : i + 1], one.mean)
        torch.testing.assert_close(joint.std[i : i + 1], one.std)
        torch.testing.assert_close(joint.log_prob[i : i + 1], one.log_prob)
    # a scalar next to a [B] sigma broadcasts too
    sigma_next = 0.0 if step is sde_step_with_logprob else 0.2
    mixed = step(v, x, sigma, sigma_next, noise_level=0.7, sigma_max=0.9, prev_sample=x_next)
    assert mixed.log_prob.shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        step(v, x, torch.tensor([0.5, 0.4]), 0.3, prev_sample=x_next)


def test_cps_step_hand_values():
    # s = 0.5, s' = 0.25, a = 0.5: x0hat = x - 0.5v = [0.75, 2.5], x1hat = x + 0.5v = [1.25, 1.5],
    # std = 0.25*sin(pi/4) = 0.1767767, sqrt(s'^2 - std^2) = 0.1767767,
    # mean = 0.75*x0hat + 0.1767767*x1hat = [0.7834709, 2.1401650].
    std = 0.17677670
    mean = torch.tensor([[0.7834709, 2.1401650]])
    x_next = mean + std * torch.tensor([[1.0, -2.0]])
    out = cps_step_with_logprob(V, X, 0.5, 0.25, noise_level=0.5, prev_sample=x_next, log_prob_form="gaussian")
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std.reshape(()), torch.tensor(std))
    # full Gaussian log-density: -1.25 - log(0.1767767) - log sqrt(2 pi)
    torch.testing.assert_close(out.log_prob, torch.tensor([-0.4360706]), rtol=1e-5, atol=1e-5)
    # the default (Flow-GRPO's CPS form): mean of -(x' - mean)^2 = -std^2 (1 + 4) / 2 = -0.078125
    ref = cps_step_with_logprob(V, X, 0.5, 0.25, noise_level=0.5, prev_sample=x_next)
    torch.testing.assert_close(ref.mean, mean)
    torch.testing.assert_close(ref.log_prob, torch.tensor([-0.078125]), rtol=1e-5, atol=1e-6)
    assert STEP_FUNCTIONS["cps"] is cps_step_with_logprob


def test_cps_onto_zero_is_the_deterministic_x0_prediction():
    out = cps_step_with_logprob(V, X, 0.5, 0.0, noise_level=0.7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, torch.tensor([[0.75, 2.5]]))  # x - s v
    assert out.log_prob.item() == 0.0


def test_ode_step_hand_values():
    # x + v*(s' - s) = [1, 2] + [0.5, -1]*(-0.25) = [0.875, 2.25]
    torch.testing.assert_close(ode_step(V, X, 0.5, 0.25), torch.tensor([[0.875, 2.25]]))
    per_sample = ode_step(V.repeat(2, 1), X.repeat(2, 1), torch.tensor([0.5, 1.0]), torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(per_sample, torch.tensor([[0.875, 2.25], [0.75, 2.5]]))


def test_gaussian_kl_zero_and_hand_value():
    mean = torch.tensor([[0.3, -0.1]])
    std = torch.tensor([[0.5]])
    assert gaussian_kl(mean, mean.clone(), std).item() == 0.0
    # diffs [0.1, -0.2]: mean over dims of d^2 / (2 * 0.25) = (0.01 + 0.04) / 2 / 0.5 = 0.05
    torch.testing.assert_close(gaussian_kl(mean, mean - torch.tensor([[0.1, -0.2]]), std), torch.tensor([0.05]))
    # equals torch's KL between the two Gaussians, averaged over dims
    p = torch.distributions.Normal(mean, std.expand_as(mean))
    q = torch.distributions.Normal(mean + 0.3, std.expand_as(mean))
    torch.testing.assert_close(gaussian_kl(mean, mean + 0.3, std), torch.distributions.kl_divergence(p, q).mean(1))


def test_sde_mean_tends_to_the_ode_step_as_noise_vanishes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 4, generator=g)
    v = torch.randn(2, 4, 4, 4, generator=g)
    ode = ode_step(v, x, 0.6, 0.5)
    gaps = []
    for a in (0.2, 0.1, 0.05):
        out = sde_step_with_logprob(v, x, 0.6, 0.5, noise_level=a, prev_sample=x)
        gaps.append((out.mean - ode).abs().max().item())
    # the drift correction is sig_t^2/(2s)*(...)*dt, quadratic in a
    assert gaps[0] > 0
    assert gaps[1] == pytest.approx(gaps[0] / 4, rel=1e-3)
    assert gaps[2] == pytest.approx(gaps[0] / 16, rel=1e-3)
    exact = sde_step_with_logprob(v, x, 0.6, 0.5, noise_level=0.0, generator=g)
    torch.testing.assert_close(exact.prev_sample, ode)
    assert torch.all(exact.log_prob == 0)


def test_sde_step_keeps_the_marginals_of_a_point_mass():
    # Data = the point x0 = 2, so x_s ~ N((1-s) x0, s^2) and the exact velocity is (x_s - x0)/s.
    # One small SDE step must land (up to O(dt^2)) on x_s' ~ N((1-s') x0, s'^2).
    torch.manual_seed(0)
    x0, s, s_next = 2.0, 0.5, 0.48
    x = (1 - s) * x0 + s * torch.randn(200_000, 1)
    out = sde_step_with_logprob((x - x0) / s, x, s, s_next, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    y = out.prev_sample
    assert y.mean().item() == pytest.approx((1 - s_next) * x0, abs=5e-3)
    assert y.std().item() == pytest.approx(s_next, rel=5e-3)


def test_same_generator_same_sample_and_low_precision_inputs():
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    v = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    a = sde_step_with_logprob(v, x, 0.6, 0.5, generator=torch.Generator().manual_seed(9))
    b = sde_step_with_logprob(v, x, 0.6, 0.5, generator=torch.Generator().manual_seed(9))
    c = sde_step_with_logprob(v, x, 0.6, 0.5, generator=torch.Generator().manual_seed(10))
    assert torch.equal(a.prev_sample, b.prev_sample) and not torch.equal(a.prev_sample, c.prev_sample)
    # bf16 latents: float32 math, the sample is stored in bf16 and its log-prob is that of the stored value
    out = sde_step_with_logprob(v.bfloat16(), x.bfloat16(), 0.6, 0.5, generator=torch.Generator().manual_seed(9))
    assert out.prev_sample.dtype == torch.bfloat16 and out.log_prob.dtype == torch.float32
    again = sde_step_with_logprob(v.bfloat16(), x.bfloat16(), 0.6, 0.5, prev_sample=out.prev_sample)
    assert torch.equal(out.log_prob, again.log_prob)


def _blocks_of(x, b):
    return torch.nn.functional.avg_pool2d(x, b).repeat_interleave(b, -2).repeat_interleave(b, -1)


def test_block_noise_is_constant_on_blocks_and_scored_in_block_coordinates():
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    out = sde_step_with_logprob(v, x, 0.8, 0.6, noise_block=4, generator=torch.Generator().manual_seed(1))
    noise = out.prev_sample - out.mean
    torch.testing.assert_close(noise, _blocks_of(noise, 4), rtol=0, atol=1e-6)
    assert noise.abs().min() > 0  # and it is noise: every element moved
    # log-prob: the Gaussian density of the 3 x 4 x 2 x 2 block coordinates 4 * patch mean
    coords = lambda t: torch.nn.functional.avg_pool2d(t, 4) * 4
    expected = _normal_logp(coords(out.prev_sample), coords(out.mean), out.std)
    torch.testing.assert_close(out.log_prob, expected, rtol=0, atol=1e-5)
    again = sde_step_with_logprob(v, x, 0.8, 0.6, noise_block=4, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)
    # block 1 is Flow-GRPO's step, bit for bit
    plain = sde_step_with_logprob(v, x, 0.8, 0.6, generator=torch.Generator().manual_seed(1))
    one = sde_step_with_logprob(v, x, 0.8, 0.6, noise_block=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.prev_sample, one.prev_sample) and torch.equal(plain.log_prob, one.log_prob)
    with pytest.raises(ValueError, match="noise_block 3"):
        sde_step_with_logprob(v, x, 0.8, 0.6, noise_block=3)
    with pytest.raises(ValueError, match="needs the sde step"):
        cps_step_with_logprob(v, x, 0.8, 0.6, noise_block=4)


def test_block_noise_kl_sees_only_the_block_coordinates():
    g = torch.Generator().manual_seed(2)
    mean, std = torch.randn(2, 4, 8, 8, generator=g), torch.full((2, 1, 1, 1), 0.3)
    inside = torch.randn(2, 4, 8, 8, generator=g)
    inside = inside - _blocks_of(inside, 4)  # sums to 0 on every block: invisible to the step's noise
    assert torch.allclose(gaussian_kl(mean + inside, mean, std, noise_block=4), torch.zeros(2), atol=1e-10)
    shift = torch.full_like(mean, 0.1)  # block-constant: a shift of every block coordinate by 0.4
    torch.testing.assert_close(
        gaussian_kl(mean + shift, mean, std, noise_block=4), torch.full((2,), 0.4**2 / (2 * 0.3**2)), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("block", [1, 4])
def test_sde_with_block_noise_samples_the_data_distribution(block):
    # Data x0 ~ N(0, c^2 I), whose exact velocity is linear: v(x, s) = (s - (1-s) c^2) x / V(s),
    # V(s) = (1-s)^2 c^2 + s^2. Integrating the SDE from pure noise must end at std c whether the
    # noise is per element or per block: the projected score correction keeps the marginals
    # (flow/sde.py). Without the projection the block run would over-correct the in-block
    # directions and end too narrow.
    c, n, steps = 0.5, 4000, 100
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    for i in range(steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        v = (s - (1 - s) * c * c) * x / ((1 - s) ** 2 * c * c + s * s)
        if s >= 1.0 or s_next == 0.0:  # the endpoints are ODE steps, as in a rollout
            x = x + v * (s_next - s)
        else:
            x = sde_step_with_logprob(v, x, s, s_next, noise_level=0.7, noise_block=block, generator=g).prev_sample
    inside = x - _blocks_of(x, 4)
    assert x.std().item() == pytest.approx(c, rel=0.02)
    assert (inside.std() / math.sqrt(15 / 16)).item() == pytest.approx(c, rel=0.02)  # the noise-free directions too
