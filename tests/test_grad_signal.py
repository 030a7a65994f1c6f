"""The signal-fraction estimator of benchmarks/grad_signal.py on gradients of known make-up."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from grad_signal import signal_fraction


@pytest.mark.parametrize("rho", [0.0, 0.05, 0.5])
def test_recovers_the_share_of_a_common_direction(rho):
    # g_i = sqrt(rho) mu + sqrt(1 - rho) e_i with |mu| = |e_i| (in expectation): cos -> rho
    g = torch.Generator().manual_seed(0)
    dims, n = 20_000, 24
    mu = torch.randn(dims, generator=g)
    grads = rho**0.5 * mu + (1 - rho) ** 0.5 * torch.randn(n, dims, generator=g)
    out = signal_fraction(grads)
    assert out["rho"] == pytest.approx(rho, abs=max(4 * out["rho_se"], 0.01))
    assert 0 < out["rho_se"] < 0.02
    if rho > 0:
        assert out["updates_needed"] == pytest.approx(1 / out["rho"])
        assert out["half_cosine"] > out["rho"]  # averaging halves the noise of each half
    else:
        assert abs(out["half_cosine"]) < 0.1


def test_a_few_huge_updates_do_not_decide_it():
    # cosines, not inner products: one update 100x longer than the rest changes rho little
    g = torch.Generator().manual_seed(1)
    grads = torch.randn(16, 5_000, generator=g)
    grads[0] *= 100
    assert abs(signal_fraction(grads)["rho"]) < 0.01
