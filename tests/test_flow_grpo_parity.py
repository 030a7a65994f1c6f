"""Parity with Flow-GRPO's own functions, FLUX.1 and SD3, on the tiny pipelines with the same noise.

Opt-in: set ``APEX_FLOW_GRPO`` to a checkout of Flow-GRPO (github.com/yifan123/flow_grpo); without
it these tests skip. They run ``benchmarks/flow_grpo_parity.py`` once (about 15 s on one core),
which imports Flow-GRPO's rollout, step, training recompute, advantage and EMA code from there.
The numbers asserted on the measured (deliberate) differences are the ones
docs/method/flow-grpo-parity.md quotes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import flow_grpo_parity as parity

CHECKOUT = os.environ.get("APEX_FLOW_GRPO")
needs_checkout = pytest.mark.skipif(not CHECKOUT, reason="set APEX_FLOW_GRPO to a Flow-GRPO checkout to compare")
pytestmark = pytest.mark.reference
TOL = 1e-5


@pytest.fixture(scope="module")
def report() -> parity.Report:
    return parity.run(parity.load_flow_grpo(Path(CHECKOUT)), tol=TOL)


@needs_checkout
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_rollout_matches_flow_grpos_pipeline(report, family):
    section = f"{family} rollout"
    for quantity in ("sigmas", "transformer timestep", "sig_t", "step std"):
        assert report.value(section, quantity) <= 1e-6, quantity  # the same schedule and timesteps
    for quantity in ("latents", "SDE means", "log-probs"):
        assert report.value(section, quantity) <= TOL, quantity
    if family == "flux":
        assert report.value(section, "guidance") == 0  # the same guidance embedding input
    assert report.value(f"{family} eval", f"latents, {28 if family == 'flux' else 40} ODE steps") <= TOL


@needs_checkout
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_training_recompute_matches_compute_log_prob(report, family):
    section = f"{family} recompute"
    for quantity in ("log-probs", "means", "sig_t", "apex on-policy |ratio - 1|", "Flow-GRPO on-policy |ratio - 1|"):
        assert report.value(section, quantity) <= TOL, quantity
    kl = f"{family} KL, ratio"
    assert report.value(kl, "KL (reference form), perturbed model") <= TOL
    assert report.value(kl, "off-policy ratio, perturbed model") <= TOL


@needs_checkout
def test_every_checked_quantity_passes_and_advantages_agree(report):
    assert report.failed() == []
    assert report.value("recipe", "advantages (per-prompt mean, batch std)") <= TOL


@needs_checkout
def test_the_deliberate_differences_are_as_documented(report):
    # the last step: Flow-GRPO's SDE noise on the final latent, which apex's ODE last step omits;
    # the window before it is identical
    assert report.value("flux trainer rollout", "latents before the last step") == 0
    assert report.value("flux trainer rollout", "std of Flow-GRPO's last-step noise") == pytest.approx(0.288, abs=1e-3)
    assert report.value("sd3 trainer rollout", "std of Flow-GRPO's last-step noise") == pytest.approx(0.0063, abs=1e-4)
    # the EMA: Flow-GRPO applies a qualifying update once per micro-batch, apex once
    six = report.value("recipe", "EMA weight of a new policy, 6 micro-batches per step (32 GPUs)")
    assert six == pytest.approx(1 - 0.9**6, rel=1e-5)
    assert report.value("recipe", "EMA weight of a new policy, 24 micro-batches per step (8 GPUs)") == pytest.approx(
        1 - 0.9**24, rel=1e-5
    )
    # bf16: apex's on-policy ratio stays exactly 1; Flow-GRPO's does not (latents stored in bf16)
    assert report.value("flux bf16", "apex on-policy |ratio - 1|") == 0
    assert report.value("flux bf16", "  of which: latents stored in bf16 after the log-prob") > 1e-6


def test_a_folder_that_is_not_a_checkout_is_exit_status_2(tmp_path, capsys):
    assert parity.main(["--flow-grpo", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a Flow-GRPO checkout" in err and "sd3_sde_with_logprob.py" in err
