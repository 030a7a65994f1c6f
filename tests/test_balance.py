"""Balancer strategies on hand-computed tensors: edge cases, invariances, state, errors."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from apexcli.balance import BALANCERS, BalanceConfig, build_balancer, build_balancer_from_config
from apexcli.errors import ApexError

NAN = float("nan")
SQRT3 = math.sqrt(3.0)


def make(name: str, objectives=("a", "b"), **options):
    if name == "apex":
        options.setdefault("warmup", 0)  # exercise the priorities from the first step
    return build_balancer(name, list(objectives), **options)


def noisy_batch(seed: int, k: int = 2, groups: int = 4, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(groups * size, k, generator=gen, dtype=torch.float64)
    g = torch.arange(groups).repeat_interleave(size)
    return r, g


def assert_clean(adv: torch.Tensor, info: dict, k: int) -> None:
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert torch.isfinite(info["per_objective"]).all()
    assert info["weights"].shape == (k,)
    assert torch.isclose(info["weights"].sum(), torch.tensor(float(k)), atol=1e-5)
    json.dumps(info["metrics"], allow_nan=False)  # JSON-serialisable finite floats only
    assert all(isinstance(v, float) for v in info["metrics"].values())


# ----------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("name", list(BALANCERS))
def test_constant_rewards_give_zero_advantages(name):
    b = make(name)
    r = torch.tensor([[3.0, -1.0]] * 6)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    for _ in range(3):
        adv, info = b(r, g)
        assert_clean(adv, info, 2)
        assert torch.equal(adv, torch.zeros(6))
        assert torch.equal(info["per_objective"], torch.zeros(6, 2))
    zeros, info = make(name)(torch.zeros(6, 2), g)
    assert torch.equal(zeros, torch.zeros(6))
    assert info["metrics"]["balance/flat_frac/a"] == 1.0


@pytest.mark.parametrize("name", ["gdpo", "apex", "dwa", "mgda", "random"])
def test_flat_group_gets_zero_and_hand_value_elsewhere(name):
    # K = 1: group 0 = [1, 2, 3] -> z = ±1/sqrt(2/3) = ±sqrt(1.5); group 1 flat.
    # Stage 2 divides by sqrt(mean(z^2)) = sqrt(3 / 6) -> ±sqrt(3).
    b = make(name, objectives=["a"])
    adv, info = b(torch.tensor([[1.0], [2.0], [3.0], [5.0], [5.0], [5.0]]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert_clean(adv, info, 1)
    expected = torch.tensor([-SQRT3, 0.0, SQRT3, 0.0, 0.0, 0.0])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert info["metrics"]["balance/flat_frac/a"] == 0.5


def test_static_hand_values_group_and_global_std():
    r = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0], [0.0, 0.0], [0.0, 2.0]])
    g = torch.tensor([7, 7, 7, 9, 9])
    # R = [1, 5, 9 | 0, 2]; group 7: mean 5, std sqrt(32/3); group 9: mean 1, std 1
    adv, info = make("static", std_scope="group", eps=1e-6)(r, g)
    s7 = math.sqrt(32 / 3)
    assert torch.allclose(adv, torch.tensor([-4 / s7, 0.0, 4 / s7, -1.0, 1.0]), atol=1e-5)
    # global: std of all R = [1, 5, 9, 0, 2] about its mean 3.4
    sd = torch.tensor([1.0, 5, 9, 0, 2]).std(unbiased=False).item()
    adv_g, _ = make("static", std_scope="global", eps=1e-6)(r, g)
    assert torch.allclose(adv_g, torch.tensor([-4 / sd, 0, 4 / sd, -1 / sd, 1 / sd]), atol=1e-5)
    # shares of the advantage's variance always sum to 1
    m = info["metrics"]
    assert m["balance/share/a"] + m["balance/share/b"] == pytest.approx(1.0)


def test_static_nan_is_replaced_by_group_mean():
    # b's NaN -> mean of the group's valid b = (0 + 2) / 2 = 1, so R = [1, 4, 7] -> ±3/sqrt(6)
    r = torch.tensor([[1.0, 0.0], [3.0, NAN], [5.0, 2.0]])
    adv, info = make("static", eps=1e-6)(r, torch.zeros(3, dtype=torch.long))
    assert_clean(adv, info, 2)
    assert torch.allclose(adv, torch.tensor([-3 / math.sqrt(6), 0.0, 3 / math.sqrt(6)]), atol=1e-5)
    assert info["metrics"]["balance/nan_frac/b"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", list(BALANCERS))
def test_nan_column_is_masked(name):
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 6.0])
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    r = torch.stack([a, torch.full((6,), NAN)], 1)
    b = make(name)
    for _ in range(2):
        adv, info = b(r, g)
        assert_clean(adv, info, 2)
        assert torch.equal(info["per_objective"][:, 1], torch.zeros(6))
    # the advantage is the one of objective a alone (any positive weight; stage 2 removes it)
    alone, _ = make(name, objectives=["a"])(a.unsqueeze(1), g)
    assert torch.allclose(adv, alone, atol=1e-5)


@pytest.mark.parametrize("name", list(BALANCERS))
def test_inf_entries_and_single_sample_group(name):
    r = torch.tensor([[1.0, 5.0], [2.0, float("inf")], [3.0, 4.0], [9.0, -9.0]])
    g = torch.tensor([0, 0, 0, 1])  # group 1 has one sample: no baseline, advantage 0
    b = make(name)
    for _ in range(2):
        adv, info = b(r, g)
        assert_clean(adv, info, 2)
        assert adv[3].item() == 0.0
        assert info["per_objective"][1, 1].item() == 0.0
        assert adv.abs().max() > 0


@pytest.mark.parametrize("name", list(BALANCERS))
def test_single_objective(name):
    r, g = noisy_batch(0, k=1)
    b = make(name, objectives=["only"])
    for _ in range(3):
        adv, info = b(r, g)
        assert_clean(adv, info, 1)
        assert info["weights"].item() == pytest.approx(1.0)
    assert not b.wants_probe(0)  # nothing to balance: no probe
    # K = 1, 1-D rewards accepted
    adv1, _ = make(name, objectives=["only"])(r[:, 0], g)
    assert adv1.shape == (r.shape[0],)


# ----------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("name", ["gdpo", "apex"])
@pytest.mark.parametrize("transform", [lambda x: 1000 * x, lambda x: x + 1e6])
def test_scale_and_offset_invariance(name, transform):
    ref, moved = make(name), make(name)
    for seed in range(4):  # several steps: apex's running statistics and priorities too
        r, g = noisy_batch(seed)
        r2 = r.clone()
        r2[:, 1] = transform(r2[:, 1])
        adv, info = ref(r, g)
        adv2, info2 = moved(r2, g)
        assert torch.allclose(adv, adv2, atol=1e-4)
        assert torch.allclose(info["weights"], info2["weights"], atol=1e-5)


def test_static_is_not_scale_invariant():
    r, g = noisy_batch(0)
    r2 = r.clone()
    r2[:, 1] *= 1000
    adv, info = make("static")(r, g)
    adv2, info2 = make("static")(r2, g)
    assert not torch.allclose(adv, adv2, atol=1e-2)
    # variance hijacking, measured: the scaled objective explains almost all the advantage
    assert info2["metrics"]["balance/share/b"] > 0.99
    assert 0.2 < info["metrics"]["balance/share/b"] < 0.8
    adv3, _ = make("static")(r + torch.tensor([0.0, 1e6], dtype=torch.float64), g)
    assert torch.allclose(adv, adv3, atol=1e-4)  # an offset alone cancels against the group mean


# ----------------------------------------------------------------------------- apex
def test_apex_lp_zero_for_flat_objective_and_pn_for_laggard():
    b = make("apex", objectives=["flat", "noisy", "rising"])
    gen = torch.Generator().manual_seed(0)
    g = torch.arange(4).repeat_interleave(5)
    for step in range(6):
        noisy = torch.randn(20, generator=gen, dtype=torch.float64)
        rising = torch.randn(20, generator=gen, dtype=torch.float64) + 3.0 * step
        flat = g.to(torch.float64)  # constant inside every group
        _, info = b(torch.stack([flat, noisy, rising], 1), g)
    m = info["metrics"]
    assert m["balance/lp/flat"] == 0.0
    assert m["balance/flat_frac/flat"] == 1.0
    assert m["balance/lp/noisy"] > 0.5
    assert m["balance/pn/rising"] == 0.0  # the leader needs nothing
    assert m["balance/pn/noisy"] > 0.9  # stationary: most need among objectives that vary
    assert m["balance/weight/noisy"] > m["balance/weight/rising"]


def test_apex_progress_from_the_probe_not_from_the_batches():
    b = make("apex", objectives=["a", "b", "c"], progress_prompts=8, probe_every=2)
    assert b.wants_progress(0) and not b.wants_progress(1) and b.wants_progress(2)
    assert not make("apex", objectives=["a"], progress_prompts=8, probe_every=2).wants_progress(0)  # nothing to compare
    r, g = noisy_batch(3, k=3)
    b.set_progress_means(torch.tensor([1.0, 5.0, float("nan")]), torch.tensor([0.5, 2.0, float("nan")]))  # the base
    b.set_progress_means(torch.tensor([1.5, 4.0, float("nan")]), torch.tensor([0.4, 2.0, float("nan")]))
    # the batches' means rise by 10 per step: progress read from them would make b the leader
    for step in range(3):
        _, info = b(r + torch.tensor([0.0, 10.0 * step, 0.0], dtype=torch.float64), g)
    m = info["metrics"]
    assert m["balance/progress/a"] == pytest.approx((1.5 - 1.0) / 0.5)  # in the probe's first std
    assert m["balance/progress/b"] == pytest.approx((4.0 - 5.0) / 2.0)
    assert m["balance/progress/c"] == 0.0 and m["balance/pn/c"] == 0.0  # never measured: no need
    assert m["balance/pn/a"] == 0.0 and m["balance/pn/b"] == pytest.approx(1.0)
    restored = make("apex", objectives=["a", "b", "c"], progress_prompts=8, probe_every=2)
    restored.load_state_dict(b.state_dict())
    _, i1 = b(r, g)
    _, i2 = restored(r, g)
    assert i1["metrics"] == i2["metrics"]


def test_apex_conflict_proxy_identical_vs_opposed():
    r, g = noisy_batch(1, k=1)
    same = torch.cat([r, 2 * r + 1], 1)
    opposed = torch.cat([r, -r], 1)
    _, info = make("apex")(same, g)
    assert info["metrics"]["balance/cp/a"] == pytest.approx(0.0, abs=1e-9)
    _, info = make("apex")(opposed, g)
    assert info["metrics"]["balance/cp/a"] == pytest.approx(1.0)
    assert info["metrics"]["balance/cp/b"] == pytest.approx(1.0)
    assert info["metrics"]["balance/cp_exact"] == 0.0


def test_apex_conflict_penalty_is_symmetric():
    # a and b fully opposed in every group (proxy cosine -1); the progress probe says b lags
    r, g = noisy_batch(3, k=1)
    opposed = torch.cat([r, -r], 1)
    b = make("apex", progress_prompts=4, probe_every=1, warmup=0, smoothing=0.0, b_lp=0.0, b_pn=0.0)
    b.set_progress_means(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
    b.set_progress_means(torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.0]))  # a ahead, b behind
    _, info = b(opposed, g)
    m = info["metrics"]
    assert m["balance/cos/a,b"] == pytest.approx(-1.0)
    assert m["balance/cp/a"] == pytest.approx(1.0) and m["balance/cp/b"] == pytest.approx(1.0)  # both pay
    assert m["balance/weight/a"] == pytest.approx(m["balance/weight/b"])  # so the weights do not shift
    with pytest.raises(ApexError, match="unknown option 'conflict'"):
        make("apex", conflict="leader_yields")


def test_apex_uses_probe_gram_on_the_next_step_only():
    r, g = noisy_batch(2)
    same = torch.cat([r[:, :1], r[:, :1]], 1)  # proxy says no conflict
    b = make("apex", probe_every=5)
    assert b.wants_probe(0) and not b.wants_probe(3) and b.wants_probe(10)
    b.set_gradient_gram(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # exact: fully opposed
    _, info = b(same, g)
    assert info["metrics"]["balance/cp_exact"] == 1.0
    assert info["metrics"]["balance/cp/a"] == pytest.approx(1.0)
    _, info = b(same, g)
    assert info["metrics"]["balance/cp_exact"] == 0.0
    assert info["metrics"]["balance/cp/a"] == pytest.approx(0.0, abs=1e-9)
    b.set_gradient_gram(torch.tensor([[NAN, 0.0], [0.0, 1.0]]))  # a failed probe is dropped
    _, info = b(same, g)
    assert info["metrics"]["balance/cp_exact"] == 0.0
    assert not make("apex", probe_every=0).wants_probe(0)
    assert not make("apex", b_cp=0.0).wants_probe(0)  # the term off: no probe for it
    assert not make("gdpo").wants_probe(0)


def test_apex_weights_sum_to_k_and_respect_floor():
    b = make("apex", objectives=["a", "b", "c"], b_lp=20.0, b_pn=20.0, tau=0.05, floor=0.2, smoothing=0.0)
    gen = torch.Generator().manual_seed(3)
    g = torch.arange(4).repeat_interleave(6)
    for step in range(8):
        r = torch.randn(24, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 0.1, 5.0])
        r[:, 2] += step
        _, info = b(r, g)
        w = info["weights"]
        assert w.sum().item() == pytest.approx(3.0, abs=1e-5)
        assert w.min().item() >= 0.2 - 1e-6
    assert w.max().item() > 2.0  # the extreme settings do move the weights


def test_apex_warmup_uses_user_weights_and_zero_coefficients_switch_terms_off():
    r, g = noisy_batch(4, k=3)
    b = make("apex", objectives=["a", "b", "c"], weights=[1.0, 2.0, 3.0], warmup=2)
    for _ in range(2):
        _, info = b(r, g)
        assert torch.allclose(info["weights"], torch.tensor([0.5, 1.0, 1.5]))
    _, info = b(r, g)
    assert not torch.allclose(info["weights"], torch.tensor([0.5, 1.0, 1.5]))
    # every coefficient 0 and no floor/smoothing: the user weights exactly (softmax(log u) = u / sum u)
    plain = make("apex", objectives=["a", "b", "c"], weights=[1.0, 2.0, 3.0], b_lp=0.0, b_cp=0.0, b_pn=0.0, floor=0.0)
    for _ in range(3):
        _, info = plain(r, g)
    assert torch.allclose(info["weights"], torch.tensor([0.5, 1.0, 1.5]), atol=1e-6)


def test_apex_dsan_floor_tames_near_flat_groups():
    # group 1 is nearly flat (spread 1e-4) while k's batch spread is ~1: gdpo blows it up to
    # unit z-scores, DSAN keeps it at ~1e-4 / (rho S_k).
    r = torch.tensor([[0.0], [1.0], [2.0], [5.0], [5.0001], [5.0]], dtype=torch.float64)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    _, gd = make("gdpo", objectives=["a"])(r, g)
    _, ap = make("apex", objectives=["a"])(r, g)
    _, off = make("apex", objectives=["a"], rho=0.0)(r, g)
    assert gd["per_objective"][3:].abs().max() > 0.5
    assert ap["per_objective"][3:].abs().max() < 1e-3
    # rho 0: no floor, gdpo's std + eps exactly (bounded on a near-flat group; a flat one is 0)
    assert torch.equal(off["per_objective"], gd["per_objective"])
    flat = torch.tensor([[1.0], [1.0], [1.0], [0.0], [1.0], [2.0]], dtype=torch.float64)
    _, z = make("apex", objectives=["a"], rho=0.0)(flat, g)
    assert torch.equal(z["per_objective"][:3], torch.zeros(3, 1)) and torch.isfinite(z["per_objective"]).all()


def test_eps_and_dropping_default_to_each_strategys_own():
    r, g = noisy_batch(4, k=2)
    for name in BALANCERS:
        b = make(name)
        assert b.eps == (1e-4 if name == "static" else 1e-6), name
        assert b.drops_zero_advantage == (name in ("static", "pareto")), name
        assert make(name, eps=1e-3).eps == 1e-3
        assert make(name, drop_zero_advantage=False).drops_zero_advantage is False
        assert make(name, drop_zero_advantage=True).drops_zero_advantage is True
    # left null, static's advantages use 1e-4 for the std of R and its logged z-scores 1e-6 (gdpo's)
    _, default = make("static")(r, g)
    _, gd = make("gdpo")(r, g)
    assert torch.equal(default["per_objective"], gd["per_objective"])


# ----------------------------------------------------------------------------- dwa / mgda / random
def test_dwa_favours_the_objective_that_stalls():
    b = make("dwa")
    g = torch.arange(4).repeat_interleave(5)
    gen = torch.Generator().manual_seed(5)
    for step in range(5):
        r = torch.randn(20, 2, generator=gen, dtype=torch.float64)
        r[:, 0] += 2.0 * step  # a improves fast, b does not
        _, info = b(r, g)
    assert info["weights"][1] > info["weights"][0]


def test_mgda_uniform_before_probe_then_min_norm():
    b = make("mgda", probe_every=3)
    r, g = noisy_batch(6)
    _, info = b(r, g)
    assert torch.equal(info["weights"], torch.ones(2))
    assert b.wants_probe(0) and b.wants_probe(3) and not b.wants_probe(1)
    b.set_gradient_gram(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # lambda_1 = 1/5
    _, info = b(r, g)
    assert torch.allclose(info["weights"], torch.tensor([0.4, 1.6]))


def test_random_is_seeded_and_resumable():
    r, g = noisy_batch(7, k=3)
    a = make("random", objectives=["a", "b", "c"], seed=3)
    b = make("random", objectives=["a", "b", "c"], seed=3)
    c = make("random", objectives=["a", "b", "c"], seed=4)
    wa = [a(r, g)[1]["weights"] for _ in range(3)]
    wb = [b(r, g)[1]["weights"] for _ in range(3)]
    wc = [c(r, g)[1]["weights"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    assert not torch.equal(wa[0], wa[1])
    assert not torch.equal(wa[0], wc[0])


# ----------------------------------------------------------------------------- state
@pytest.mark.parametrize("name", list(BALANCERS))
def test_state_dict_round_trip_gives_identical_next_step(name):
    b = make(name, objectives=["a", "b", "c"], probe_every=2)
    for seed in range(5):
        r, g = noisy_batch(seed, k=3)
        r[:, 2] += seed
        b(r, g)
        if b.wants_probe(seed):
            b.set_gradient_gram(torch.tensor([[2.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [0.5, 0.0, 3.0]]))
    sd = b.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    via_torch = torch.load(buf, weights_only=True)
    via_json = json.loads(json.dumps(sd))
    r, g = noisy_batch(99, k=3)
    adv, info = b(r, g)
    for state in (via_torch, via_json):
        fresh = make(name, objectives=["a", "b", "c"], probe_every=2)
        fresh.load_state_dict(state)
        adv2, info2 = fresh(r, g)
        assert torch.equal(info["weights"], info2["weights"])
        assert torch.equal(adv, adv2)


def test_load_state_dict_rejects_other_strategy_or_objectives():
    sd = make("apex").state_dict()
    with pytest.raises(ApexError, match="strategy 'apex'"):
        make("gdpo").load_state_dict(sd)
    with pytest.raises(ApexError, match="objectives"):
        make("apex", objectives=["a", "c"]).load_state_dict(sd)


# ----------------------------------------------------------------------------- construction errors
def test_build_balancer_errors():
    with pytest.raises(
        ApexError, match="unknown balance strategy 'fancy'; valid: static, gdpo, apex, dwa, mgda, random"
    ):
        build_balancer("fancy", ["a"])
    with pytest.raises(ApexError, match=r"config key 'balance.weights' has 3 values but there are 2 objectives"):
        build_balancer("gdpo", ["a", "b"], weights=[1, 2, 3])
    with pytest.raises(ApexError, match=r"config key 'balance.apex.tau' must be > 0, got 0"):
        build_balancer("apex", ["a", "b"], tau=0)
    with pytest.raises(ApexError, match="unknown option 'temperature' for balance strategy 'apex'"):
        build_balancer("apex", ["a", "b"], temperature=2.0)
    with pytest.raises(
        ApexError, match="config key 'balance.experimental.progress_prompts' needs balance.probe_every > 0"
    ):
        build_balancer("apex", ["a", "b"], progress_prompts=4, probe_every=0)
    with pytest.raises(ApexError, match="unknown option 'terms' for balance strategy 'apex'"):
        build_balancer("apex", ["a", "b"], terms="lp,cp")
    with pytest.raises(ApexError, match="rewards have shape"):
        build_balancer("gdpo", ["a", "b"])(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ApexError, match="duplicates"):
        build_balancer("gdpo", ["a", "a"])


def test_config_validate_names_dotted_keys():
    cfg = BalanceConfig()
    cfg.validate(2)
    for path, value, message in [
        ("apex.floor", 1.5, "config key 'balance.apex.floor' must be in [0, 1], got 1.5"),
        ("apex.smoothing", 1.0, "config key 'balance.apex.smoothing' must be in [0, 1), got 1.0"),
        ("apex.targets", [1.0], "config key 'balance.apex.targets' has 1 values but there are 2 objectives"),
        ("apex.targets", [1.0, float("inf")], "config key 'balance.apex.targets' must be a finite number, got inf"),
        ("dwa.temperature", -1.0, "config key 'balance.dwa.temperature' must be > 0"),
        ("random.alpha", 0.0, "config key 'balance.random.alpha' must be > 0"),
        ("std_scope", "batch", "config key 'balance.std_scope' must be one of global, group, got 'batch'"),
        ("probe_every", -1, "config key 'balance.probe_every' must be >= 0, got -1"),
        ("weights", [1.0, 0.0], "config key 'balance.weights' must be > 0 for apex"),
        ("weights", [1.0, -1.0], "config key 'balance.weights' must be >= 0, got -1.0"),
        ("eps", 0.0, "config key 'balance.eps' must be > 0, got 0.0"),
        ("pareto.min_score", float("nan"), "config key 'balance.pareto.min_score' must be a finite number"),
    ]:
        cfg = BalanceConfig()
        section, _, field_name = path.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, field_name, value)
        with pytest.raises(ApexError) as err:
            cfg.validate(2)
        assert message in str(err.value)
    cfg = BalanceConfig(strategy="static", weights=[1.0, 0.0])  # a monitored-only objective is fine for static
    b = build_balancer_from_config(cfg, ["a", "b"])
    assert torch.allclose(b.user_weights, torch.tensor([2.0, 0.0], dtype=torch.float64))
