"""apex's rollout and training recompute against Flow-GRPO's own functions, with the same noise.

    python benchmarks/flow_grpo_parity.py --flow-grpo DIR            # FLUX.1 and SD3, about 15 s on one core
    python benchmarks/flow_grpo_parity.py --flow-grpo DIR --family flux --tol 1e-5

DIR is a checkout of Flow-GRPO (github.com/yifan123/flow_grpo). Its functions are imported from
DIR at run time, never copied: ``flow_grpo/diffusers_patch/flux_pipeline_with_logprob.py`` and
``sd3_pipeline_with_logprob.py`` (``pipeline_with_logprob``, the rollouts),
``sd3_sde_with_logprob.py`` (``sde_step_with_logprob``, the step and its log-prob, used by both
families), ``scripts/train_flux.py`` and ``scripts/train_sd3.py`` (``compute_log_prob``, the
training recompute), ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker``) and
``flow_grpo/ema.py`` (``EMAModuleWrapper``).

Stubs: importing the two training scripts runs their module-level imports. Five of them have
nothing to do with the functions compared and are replaced by empty modules in ``sys.modules``
while the scripts load (and removed afterwards): ``absl`` and ``ml_collections`` (command-line
flags and config files), ``wandb`` (logging), ``flow_grpo.prompts`` and ``flow_grpo.rewards``
(prompt lists and reward models, which also need asset files). Nothing Flow-GRPO computes is
stubbed. Two things are patched for the duration of a call, to feed both sides the same inputs:
``sd3_sde_with_logprob.randn_tensor`` returns the step noise apex's generator draws (in FLUX's
packed token order), and a wrapper records what ``sde_step_with_logprob`` returns inside
Flow-GRPO's rollout (its means and stds, which the rollout itself discards).

Both families run on the tiny random-weight pipelines built in code (``tiny-flux`` at 128 px:
1024 packed tokens, the token count and dynamic shift of FLUX.1-dev at 512 px; ``tiny`` SD3 at
64 px), float32, with Flow-GRPO's settings for that family (FLUX: 6 steps, noise level 0.9,
guidance embedding 3.5, eval 28 ODE steps; SD3: 10 steps, noise level 0.7, CFG 4.5, eval 40):

(a) rollout: sigmas, the timestep and guidance the transformer receives, the latent after every
    step, the SDE means, ``sig_t`` and step stds, the log-probs;
(b) training recompute: the log-prob, mean and ``sig_t`` of each stored transition of the trained
    steps (``int(T * 0.99)``) from Flow-GRPO's ``compute_log_prob`` and from apex's
    ``PolicyModels.log_prob`` (what the GRPO loss calls), and each side's on-policy ratio;
(c) KL and ratio with a second, perturbed transformer: Flow-GRPO's KL expression on its
    ``compute_log_prob`` outputs against ``step_kl(..., "reference")``, and the off-policy ratios;
(d) eval: Flow-GRPO's rollout at noise level 0 against apex's ODE sampler;
plus, once: GRPO advantages (``PerPromptStatTracker(global_std=True)`` against ``static``).

Measured and printed, not checked (deliberate differences, docs/method/flow-grpo-parity.md):
apex's training rollout runs the last step with the ODE (Flow-GRPO adds SDE noise there too);
the EMA when Flow-GRPO's per-micro-batch call is replayed; and, for FLUX, bf16: Flow-GRPO's
mixed precision (float32 weights under bf16 autocast, bf16 latents stored after the log-prob
is taken) against apex's (bf16 weights, float32 latent chain), where apex's on-policy ratio is
checked to be 1. CPU autocast stands in for the GPU's, so the bf16 numbers are indicative.

A quantity passes when its max |apex - Flow-GRPO| <= tol x max(1, max |Flow-GRPO value|).
Exit status: 0 all checked quantities pass, 1 one does not, 2 DIR is not a Flow-GRPO checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.machinery
import importlib.util
import math
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from apexcli.backbones.flux import pack, unpack
from apexcli.balance import build_balancer
from apexcli.conditioning import PromptEmbeds
from apexcli.flow import sde as apex_sde
from apexcli.flow.rollout import Trajectory, latent_channels, rollout
from apexcli.models.text_cache import encode_prompts
from apexcli.models.tiny import TINY_MAX_TOKENS, build_tiny_pipeline
from apexcli.models.tiny_flux import build_tiny_flux_pipeline
from apexcli.train.ema import LoraEMA
from apexcli.train.loss import step_kl
from apexcli.train.losses.base import PolicyModels

PROMPTS = ["a red apple on a wooden table", "a lighthouse under a blue sky"]
UNRELATED_IMPORTS = ("absl", "absl.app", "absl.flags", "ml_collections", "ml_collections.config_flags", "wandb")
UNRELATED_PACKAGE_MODULES = ("flow_grpo.prompts", "flow_grpo.rewards")


class NotACheckout(Exception):
    """DIR lacks the files this comparison imports."""


# ----------------------------------------------------------------------------- loading Flow-GRPO


@dataclass
class FlowGrpo:
    """Flow-GRPO's modules, imported from a checkout."""

    sde: types.ModuleType
    flux_pipeline: types.ModuleType
    sd3_pipeline: types.ModuleType
    train_flux: types.ModuleType
    train_sd3: types.ModuleType
    stat_tracking: types.ModuleType
    ema: types.ModuleType


def _empty_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # accelerate probes find_spec
    module.__dict__.update(attrs)
    return module


@contextlib.contextmanager
def _stubbed(modules: dict[str, types.ModuleType]) -> Iterator[None]:
    """``modules`` in ``sys.modules`` for the duration; what was there before comes back."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _unrelated_stubs() -> dict[str, types.ModuleType]:
    flags = _empty_module("absl.flags", FLAGS=None)
    app = _empty_module("absl.app", run=None)
    config_flags = _empty_module("ml_collections.config_flags", DEFINE_config_file=lambda *a, **k: None)
    stubs = {
        "absl": _empty_module("absl", app=app, flags=flags),
        "absl.app": app,
        "absl.flags": flags,
        "ml_collections": _empty_module("ml_collections", config_flags=config_flags),
        "ml_collections.config_flags": config_flags,
        "wandb": _empty_module("wandb"),
    }
    stubs.update({name: _empty_module(name) for name in UNRELATED_PACKAGE_MODULES})
    return stubs


def _load_script(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_flow_grpo(root: Path) -> FlowGrpo:
    """Import Flow-GRPO's functions from the checkout ``root`` (put on ``sys.path``)."""
    root = root.resolve()
    needed = [
        "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py",
        "flow_grpo/diffusers_patch/flux_pipeline_with_logprob.py",
        "flow_grpo/diffusers_patch/sd3_pipeline_with_logprob.py",
        "flow_grpo/stat_tracking.py",
        "flow_grpo/ema.py",
        "scripts/train_flux.py",
        "scripts/train_sd3.py",
    ]
    missing = [p for p in needed if not (root / p).is_file()]
    if missing:
        raise NotACheckout(f"{root} is not a Flow-GRPO checkout: no {', '.join(missing)}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import_module = importlib.import_module
    with _stubbed(_unrelated_stubs()):
        train_flux = _load_script(root / "scripts/train_flux.py", "flow_grpo_train_flux")
        train_sd3 = _load_script(root / "scripts/train_sd3.py", "flow_grpo_train_sd3")
    return FlowGrpo(
        sde=import_module("flow_grpo.diffusers_patch.sd3_sde_with_logprob"),
        flux_pipeline=import_module("flow_grpo.diffusers_patch.flux_pipeline_with_logprob"),
        sd3_pipeline=import_module("flow_grpo.diffusers_patch.sd3_pipeline_with_logprob"),
        train_flux=train_flux,
        train_sd3=train_sd3,
        stat_tracking=import_module("flow_grpo.stat_tracking"),
        ema=import_module("flow_grpo.ema"),
    )


# ----------------------------------------------------------------------------- instrumentation


@contextlib.contextmanager
def fixed_noise(sde_module: types.ModuleType, draws: list[torch.Tensor]) -> Iterator[None]:
    """Flow-GRPO's step noise is ``draws`` in order (each must match the requested shape)."""
    queue = list(draws)
    original = sde_module.randn_tensor

    def next_draw(shape, generator=None, device=None, dtype=None, **_):
        noise = queue.pop(0)
        if tuple(noise.shape) != tuple(shape):
            raise RuntimeError(f"noise of shape {tuple(noise.shape)} where the step asked for {tuple(shape)}")
        return noise.to(device=device, dtype=dtype)

    sde_module.randn_tensor = next_draw
    try:
        yield
    finally:
        sde_module.randn_tensor = original
    if queue:
        raise RuntimeError(f"{len(queue)} step noises left unused")


@contextlib.contextmanager
def recording(owner, name: str, calls: list) -> Iterator[None]:
    """Call ``owner.<name>`` as before and append ``(args, kwargs, result)`` of each call to ``calls``."""
    original = owner[name] if isinstance(owner, dict) else getattr(owner, name)

    def recorder(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append((args, kwargs, result))
        return result

    if isinstance(owner, dict):
        owner[name] = recorder
    else:
        setattr(owner, name, recorder)
    try:
        yield
    finally:
        if isinstance(owner, dict):
            owner[name] = original
        else:
            setattr(owner, name, original)


@contextlib.contextmanager
def transformer_inputs(transformer: torch.nn.Module, calls: list) -> Iterator[None]:
    """Record the ``timestep`` and ``guidance`` of every transformer forward."""

    def hook(_module, _args, kwargs):
        guidance = kwargs.get("guidance")
        calls.append((kwargs["timestep"].detach().clone(), None if guidance is None else guidance.detach().clone()))

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """``module``'s forward under CPU autocast, as accelerate wraps a prepared model's forward."""
    original = module.forward

    def forward(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return original(*args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        del module.forward


class DistributedLike(torch.nn.Module):
    """Stands in for the DDP wrapper Flow-GRPO's FLUX ``compute_log_prob`` reads ``.module`` from."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


# ----------------------------------------------------------------------------- reporting


@dataclass
class Row:
    section: str
    quantity: str
    diff: float
    scale: float
    checked: bool
    note: str = ""


@dataclass
class Report:
    tol: float
    rows: list[Row] = field(default_factory=list)

    def compare(self, section: str, quantity: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
        """Max |ours - theirs| (float64), checked against tol x max(1, max |theirs|)."""
        ours, theirs = ours.detach().double(), theirs.detach().double()
        if ours.shape != theirs.shape:
            raise RuntimeError(f"{section} {quantity}: shapes {tuple(ours.shape)} and {tuple(theirs.shape)}")
        diff = (ours - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        self.rows.append(Row(section, quantity, diff, scale, True))
        return diff

    def check(self, section: str, quantity: str, value: float) -> None:
        """A value that must be 0 within tol (|ratio - 1| on-policy)."""
        self.rows.append(Row(section, quantity, value, 0.0, True))

    def measure(self, section: str, quantity: str, value: float, note: str = "") -> None:
        """A reported, unchecked number (a deliberate difference)."""
        self.rows.append(Row(section, quantity, value, 0.0, False, note))

    def value(self, section: str, quantity: str) -> float:
        """The number a row holds (its max |diff| or its measurement)."""
        return next(r.diff for r in self.rows if (r.section, r.quantity) == (section, quantity))

    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.checked and not r.diff <= self.tol * max(1.0, r.scale)]

    def print(self) -> None:
        width = max(len(f"{r.section}: {r.quantity}") for r in self.rows) + 2
        print(f"{'quantity':<{width}} {'max |diff|':>11} {'max |ref|':>10}  verdict")
        for r in self.rows:
            label = f"{r.section}: {r.quantity}"
            if r.checked:
                ok = r.diff <= self.tol * max(1.0, r.scale)
                print(f"{label:<{width}} {r.diff:11.2e} {r.scale:10.3g}  {'ok' if ok else 'FAIL'}")
            else:
                print(f"{label:<{width}} {r.diff:11.4g} {'':>10}  measured{'  ' + r.note if r.note else ''}")


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class Family:
    """What differs between the two comparisons: the pipeline, the settings, the latent layout."""

    name: str
    pipe: object
    resolution: int
    num_steps: int
    noise_level: float
    guidance: float
    eval_steps: int
    to_apex: Callable[[torch.Tensor], torch.Tensor]
    """Flow-GRPO's latent layout -> apex's ``[B, C, h, w]``."""
    to_theirs: Callable[[torch.Tensor], torch.Tensor]


def _noise(family: Family, batch: int, seed: int) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
    """Initial noise, and the seed and sequence of step noises apex's rollout will draw."""
    pipe = family.pipe
    hw = family.resolution // pipe.vae_scale_factor
    shape = (batch, latent_channels(pipe.transformer), hw, hw)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    step_seed = seed + 1
    gen = torch.Generator().manual_seed(step_seed)
    draws = [torch.randn(shape, generator=gen) for _ in range(family.num_steps)]  # as rollout draws them
    return x0, step_seed, draws


def _apex_rollout(
    family: Family,
    transformer: torch.nn.Module,
    cond: PromptEmbeds,
    uncond: PromptEmbeds,
    x0: torch.Tensor,
    step_seed: int,
    **kwargs,
) -> tuple[Trajectory, list, list]:
    steps, inputs = [], []
    options = dict(sampler="sde", noise_level=family.noise_level, num_steps=family.num_steps) | kwargs
    with recording(apex_sde.STEP_FUNCTIONS, "sde", steps), transformer_inputs(transformer, inputs):
        traj = rollout(
            transformer,
            family.pipe.scheduler,
            cond,
            height=family.resolution,
            width=family.resolution,
            vae_scale_factor=family.pipe.vae_scale_factor,
            guidance_scale=family.guidance,
            uncond=uncond,
            initial_noise=x0,
            generator=torch.Generator().manual_seed(step_seed),
            **options,
        )
    return traj, [r for _, _, r in steps], inputs


def _compare_rollouts(
    report: Report,
    family: Family,
    traj: Trajectory,
    apex_steps: list,
    apex_inputs: list,
    their_latents: list[torch.Tensor],
    their_log_probs: list[torch.Tensor],
    their_steps: list,
    their_inputs: list,
) -> None:
    section = f"{family.name} rollout"
    sigmas = family.pipe.scheduler.sigmas.float()
    report.compare(section, "sigmas", traj.sigmas, sigmas)
    report.compare(
        section,
        "transformer timestep",
        torch.stack([t for t, _ in apex_inputs]),
        torch.stack([t for t, _ in their_inputs]),
    )
    if apex_inputs[0][1] is not None:
        report.compare(
            section, "guidance", torch.stack([g for _, g in apex_inputs]), torch.stack([g for _, g in their_inputs])
        )
    report.compare(section, "latents", traj.latents, torch.stack([family.to_apex(x) for x in their_latents], 1))
    means = torch.stack([family.to_apex(r[2]) for _, _, r in their_steps], 1)
    report.compare(section, "SDE means", torch.stack([o.mean for o in apex_steps], 1), means)
    batch = traj.latents.shape[0]
    sig_t = torch.stack([r[3].reshape(-1).expand(batch) for _, _, r in their_steps], 1)
    report.compare(section, "sig_t", torch.stack([o.noise_scale.reshape(batch) for o in apex_steps], 1), sig_t)
    dt = (sigmas[:-1] - sigmas[1:]).sqrt()
    report.compare(section, "step std", torch.stack([o.std.reshape(batch) for o in apex_steps], 1), sig_t * dt)
    report.compare(section, "log-probs", traj.log_probs, torch.stack(their_log_probs, 1))


def _perturbed(transformer: torch.nn.Module, scale: float = 0.02, seed: int = 7) -> torch.nn.Module:
    """A copy with every weight moved by ``scale`` x N(0, 1): another policy, same architecture."""
    other = copy.deepcopy(transformer)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def _apex_recompute(models: PolicyModels, model, traj: Trajectory, cond: PromptEmbeds, steps: list[int]) -> list:
    """What the GRPO loss computes for each trained step: per-sample sigmas, the stored transition."""
    outs = []
    batch = len(traj)
    for j in steps:
        ts = torch.full((batch,), j, dtype=torch.long)
        x, x_next = traj.latents[:, j], traj.latents[:, j + 1]
        outs.append(models.log_prob(model, traj, x, x_next, traj.sigmas[ts], traj.sigmas[ts + 1], cond))
    return outs


def _their_kl(mean: torch.Tensor, mean_ref: torch.Tensor, sig_t: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL term, per sample: the mean over the latent dims of the squared mean
    difference, over 2 sig_t^2 (``train_flux.py`` and ``train_sd3.py``, written out)."""
    return ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * sig_t.reshape(-1) ** 2)


def _compare_training(
    report: Report,
    family: Family,
    traj: Trajectory,
    cond: PromptEmbeds,
    uncond: PromptEmbeds,
    their_compute: Callable[[torch.nn.Module, int], tuple],
    their_log_probs: list[torch.Tensor],
    other: torch.nn.Module,
) -> None:
    """(b) recompute and (c) KL / off-policy ratio; ``their_compute(transformer, j)`` is their
    ``compute_log_prob`` on their stored trajectory."""
    pipe = family.pipe
    trained = list(range(int(family.num_steps * 0.99)))  # Flow-GRPO's num_train_timesteps
    models = PolicyModels(
        policy=pipe.transformer, reference=other, adapters=[], guidance_scale=family.guidance, uncond=uncond
    )
    with torch.no_grad():
        ours = _apex_recompute(models, pipe.transformer, traj, cond, trained)
        ours_other = _apex_recompute(models, other, traj, cond, trained)
        theirs = [their_compute(pipe.transformer, j) for j in trained]
        theirs_other = [their_compute(other, j) for j in trained]
    section = f"{family.name} recompute"
    stack = lambda xs: torch.stack(xs, 1)
    report.compare(section, "log-probs", stack([o.log_prob for o in ours]), stack([t[1] for t in theirs]))
    report.compare(section, "means", stack([o.mean for o in ours]), stack([family.to_apex(t[2]) for t in theirs]))
    batch = len(traj)
    report.compare(
        section,
        "sig_t",
        stack([o.noise_scale.reshape(batch) for o in ours]),
        stack([t[3].reshape(-1).expand(batch) for t in theirs]),
    )
    old_ours, old_theirs = traj.log_probs[:, trained], stack(their_log_probs)[:, trained]
    report.check(
        section,
        "apex on-policy |ratio - 1|",
        (stack([o.log_prob for o in ours]) - old_ours).exp().sub(1).abs().max().item(),
    )
    report.check(
        section,
        "Flow-GRPO on-policy |ratio - 1|",
        (stack([t[1] for t in theirs]) - old_theirs).exp().sub(1).abs().max().item(),
    )
    section = f"{family.name} KL, ratio"
    kl_ours = stack([step_kl(o, r, "reference") for o, r in zip(ours, ours_other)])
    kl_theirs = stack([_their_kl(t[2], r[2], t[3]) for t, r in zip(theirs, theirs_other)])
    report.compare(section, "KL (reference form), perturbed model", kl_ours, kl_theirs)
    report.compare(
        section,
        "off-policy ratio, perturbed model",
        (stack([o.log_prob for o in ours_other]) - old_ours).exp(),
        (stack([t[1] for t in theirs_other]) - old_theirs).exp(),
    )


def _last_step_difference(report: Report, family: Family, cond, uncond, x0, step_seed, traj: Trajectory) -> None:
    """apex's training rollout: SDE on the trained window (all but the last step), ODE on the last."""
    window = list(range(family.num_steps - 1))
    trainer_traj, _, _ = _apex_rollout(family, family.pipe.transformer, cond, uncond, x0, step_seed, sde_steps=window)
    section = f"{family.name} trainer rollout"
    report.compare(section, "latents before the last step", trainer_traj.latents[:, :-1], traj.latents[:, :-1])
    final = trainer_traj.final - traj.final
    report.measure(
        section,
        "final latent RMS difference",
        final.pow(2).mean().sqrt().item(),
        note="apex runs the last step with the ODE; Flow-GRPO adds SDE noise there too",
    )
    sig = traj.sigmas
    s = float(sig[-2])
    std_last = family.noise_level * math.sqrt(s / (1 - s)) * math.sqrt(s)
    report.measure(section, "std of Flow-GRPO's last-step noise", std_last, note=f"sigma {s:.4f} -> 0")


# ----------------------------------------------------------------------------- FLUX.1


def flux_family() -> Family:
    pipe = build_tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    hw = 128 // pipe.vae_scale_factor
    return Family(
        name="flux",
        pipe=pipe,
        resolution=128,
        num_steps=6,
        noise_level=0.9,
        guidance=3.5,
        eval_steps=28,
        to_apex=lambda x: unpack(x.float(), hw, hw),
        to_theirs=pack,
    )


def _their_flux_rollout(fg: FlowGrpo, family: Family, cond: PromptEmbeds, x0, draws, *, noise_level, steps):
    """Flow-GRPO's FLUX rollout with our initial and step noise (packed)."""
    recorded, inputs = [], []
    with (
        fixed_noise(fg.sde, [family.to_theirs(d) for d in draws]),
        recording(fg.flux_pipeline, "sde_step_with_logprob", recorded),
        transformer_inputs(family.pipe.transformer, inputs),
    ):
        _, latents, image_ids, _, log_probs = fg.flux_pipeline.pipeline_with_logprob(
            family.pipe,
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled,
            num_inference_steps=steps,
            guidance_scale=family.guidance,
            output_type="pt",
            height=family.resolution,
            width=family.resolution,
            noise_level=noise_level,
            latents=family.to_theirs(x0),
            max_sequence_length=TINY_MAX_TOKENS,
        )
    return latents, image_ids, log_probs, recorded, inputs


def _their_flux_sample(family: Family, cond: PromptEmbeds, latents, image_ids, log_probs) -> dict:
    """The sample dict ``train_flux.py`` stores after a rollout and feeds ``compute_log_prob``."""
    stacked = torch.stack(latents, dim=1)
    batch = stacked.shape[0]
    return {
        "prompt_embeds": cond.prompt_embeds.to(stacked.dtype),
        "pooled_prompt_embeds": cond.pooled.to(stacked.dtype),
        "image_ids": image_ids.unsqueeze(0).repeat(batch, 1, 1),
        "timesteps": family.pipe.scheduler.timesteps.repeat(batch, 1),
        "latents": stacked[:, :-1],
        "next_latents": stacked[:, 1:],
        "log_probs": torch.stack(log_probs, dim=1),
    }


def compare_flux(fg: FlowGrpo, report: Report, *, batch: int = 2, seed: int = 0, bf16: bool = True) -> None:
    family = flux_family()
    pipe = family.pipe
    cond = encode_prompts(pipe, PROMPTS[:batch], max_sequence_length=TINY_MAX_TOKENS, device="cpu")
    x0, step_seed, draws = _noise(family, batch, seed)
    config = SimpleNamespace(sample=SimpleNamespace(guidance_scale=family.guidance, noise_level=family.noise_level))

    # (a) the rollout: every step stochastic in both (Flow-GRPO's rollout has no ODE steps)
    traj, apex_steps, apex_inputs = _apex_rollout(family, pipe.transformer, cond, None, x0, step_seed)
    latents, image_ids, log_probs, recorded, their_inputs = _their_flux_rollout(
        fg, family, cond, x0, draws, noise_level=family.noise_level, steps=family.num_steps
    )
    _compare_rollouts(report, family, traj, apex_steps, apex_inputs, latents, log_probs, recorded, their_inputs)

    # (b), (c): their compute_log_prob on their stored trajectory, ours on ours
    sample = _their_flux_sample(family, cond, latents, image_ids, log_probs)
    other = _perturbed(pipe.transformer)

    def their_compute(transformer, j):
        return fg.train_flux.compute_log_prob(DistributedLike(transformer), pipe, sample, j, config)

    _compare_training(report, family, traj, cond, None, their_compute, log_probs, other)
    _last_step_difference(report, family, cond, None, x0, step_seed, traj)

    # (d) eval: Flow-GRPO samples at noise level 0, apex with its ODE sampler
    eval_family = copy.copy(family)
    eval_family.num_steps = family.eval_steps
    _, eval_seed, eval_draws = _noise(eval_family, batch, seed)
    eval_traj, _, _ = _apex_rollout(eval_family, pipe.transformer, cond, None, x0, eval_seed, sampler="ode")
    eval_latents, *_ = _their_flux_rollout(
        fg, eval_family, cond, x0, eval_draws, noise_level=0, steps=family.eval_steps
    )
    report.compare(
        "flux eval",
        f"latents, {family.eval_steps} ODE steps",
        eval_traj.latents,
        torch.stack([family.to_apex(x) for x in eval_latents], 1),
    )
    if bf16:
        flux_precision(fg, report, family, cond, x0, step_seed, draws, config, traj, latents)


def flux_precision(fg, report, family: Family, cond, x0, step_seed, draws, config, traj32, latents32) -> None:
    """bf16: Flow-GRPO's mixed precision against apex's, each against its own float32 run."""
    pipe = family.pipe
    section = "flux bf16"
    bf = torch.bfloat16
    trained = list(range(int(family.num_steps * 0.99)))
    # Flow-GRPO: float32 transformer under bf16 autocast (accelerate's mixed_precision="bf16"),
    # text encoders cast to bf16, so bf16 prompt embeddings, text ids and latents
    pipe.text_encoder.to(bf)
    try:
        with autocast_forward(pipe.transformer, bf), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            latents, image_ids, log_probs, recorded, rollout_inputs = _their_flux_rollout(
                fg, family, cond.to(dtype=bf), x0, draws, noise_level=family.noise_level, steps=family.num_steps
            )
            sample = _their_flux_sample(family, cond.to(dtype=bf), latents, image_ids, log_probs)
            training_inputs = []
            with torch.no_grad(), transformer_inputs(pipe.transformer, training_inputs):
                wrapped = DistributedLike(pipe.transformer)
                theirs = [fg.train_flux.compute_log_prob(wrapped, pipe, sample, j, config) for j in trained]
    finally:
        pipe.text_encoder.to(torch.float32)
    old = sample["log_probs"][:, trained]
    ratio = torch.stack([t[1] for t in theirs], 1) - old
    report.measure(
        section,
        "Flow-GRPO on-policy max |ratio - 1|",
        ratio.exp().sub(1).abs().max().item(),
        note="CPU bf16 kernels also round differently on the stored, non-contiguous latents",
    )
    # the log-prob of each step is taken on the float32 sample, which is then stored in bf16
    rounded = [
        fg.sde.sde_step_with_logprob(
            *recorded[j][0], prev_sample=sample["next_latents"][:, j].float(), **recorded[j][1]
        )[1]
        for j in trained
    ]
    report.measure(
        section,
        "  of which: latents stored in bf16 after the log-prob",
        (torch.stack(rounded, 1) - old).exp().sub(1).abs().max().item(),
    )
    # the timestep each forward sees inside the transformer: bf16(bf16(timestep) * 1000)
    seen = lambda t: (t.to(bf) * 1000).float()
    t_roll = torch.stack([seen(t) for t, _ in rollout_inputs[: len(trained)]])
    t_train = torch.stack([seen(t) for t, _ in training_inputs])
    report.measure(
        section,
        "Flow-GRPO rollout vs training timestep seen (x1000)",
        (t_roll - t_train).abs().max().item(),
        note="rollout passes bf16(t) / 1000, training float32 t / 1000",
    )

    # apex: bf16 base weights, float32 latent chain; rollout and recompute share every op
    apex_bf = copy.deepcopy(pipe.transformer).to(bf)
    traj, _, _ = _apex_rollout(family, apex_bf, cond, None, x0, step_seed)
    models = PolicyModels(policy=apex_bf, reference=apex_bf, adapters=[], guidance_scale=family.guidance, uncond=None)
    with torch.no_grad():
        ours = _apex_recompute(models, apex_bf, traj, cond, trained)
    ratio = torch.stack([o.log_prob for o in ours], 1) - traj.log_probs[:, trained]
    report.check(section, "apex on-policy |ratio - 1|", ratio.exp().sub(1).abs().max().item())
    rms = lambda a, b: (a.float() - b.float()).pow(2).mean().sqrt().item()
    report.measure(section, "apex final latent RMS vs float32", rms(traj.final, traj32.final))
    report.measure(
        section,
        "Flow-GRPO final latent RMS vs float32",
        rms(family.to_apex(latents[-1]), family.to_apex(latents32[-1])),
    )


# ----------------------------------------------------------------------------- SD3


def sd3_family() -> Family:
    pipe = build_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return Family(
        name="sd3",
        pipe=pipe,
        resolution=64,
        num_steps=10,
        noise_level=0.7,
        guidance=4.5,
        eval_steps=40,
        to_apex=lambda x: x.float(),
        to_theirs=lambda x: x,
    )


def _their_sd3_rollout(fg: FlowGrpo, family: Family, cond, uncond, x0, draws, *, noise_level, steps):
    recorded, inputs = [], []
    batch = len(cond)
    uncond = uncond.expand(batch)
    with (
        fixed_noise(fg.sde, draws),
        recording(fg.sd3_pipeline, "sde_step_with_logprob", recorded),
        transformer_inputs(family.pipe.transformer, inputs),
    ):
        _, latents, log_probs = fg.sd3_pipeline.pipeline_with_logprob(
            family.pipe,
            prompt_embeds=cond.prompt_embeds,
            pooled_prompt_embeds=cond.pooled,
            negative_prompt_embeds=uncond.prompt_embeds,
            negative_pooled_prompt_embeds=uncond.pooled,
            num_inference_steps=steps,
            guidance_scale=family.guidance,
            output_type="pt",
            height=family.resolution,
            width=family.resolution,
            noise_level=noise_level,
            latents=x0,
            max_sequence_length=TINY_MAX_TOKENS,
        )
    return latents, log_probs, recorded, inputs


def compare_sd3(fg: FlowGrpo, report: Report, *, batch: int = 2, seed: int = 0) -> None:
    family = sd3_family()
    pipe = family.pipe
    cond = encode_prompts(pipe, PROMPTS[:batch], max_sequence_length=TINY_MAX_TOKENS, device="cpu")
    uncond = encode_prompts(pipe, [""], max_sequence_length=TINY_MAX_TOKENS, device="cpu")
    x0, step_seed, draws = _noise(family, batch, seed)
    config = SimpleNamespace(
        sample=SimpleNamespace(guidance_scale=family.guidance, noise_level=family.noise_level),
        train=SimpleNamespace(cfg=True),
    )

    traj, apex_steps, apex_inputs = _apex_rollout(family, pipe.transformer, cond, uncond, x0, step_seed)
    latents, log_probs, recorded, their_inputs = _their_sd3_rollout(
        fg, family, cond, uncond, x0, draws, noise_level=family.noise_level, steps=family.num_steps
    )
    _compare_rollouts(report, family, traj, apex_steps, apex_inputs, latents, log_probs, recorded, their_inputs)

    stacked = torch.stack(latents, dim=1)
    sample = {
        "timesteps": pipe.scheduler.timesteps.repeat(batch, 1),
        "latents": stacked[:, :-1],
        "next_latents": stacked[:, 1:],
    }
    # train_sd3.py: the negative embedding first, then the prompts
    embeds = torch.cat([uncond.expand(batch).prompt_embeds, cond.prompt_embeds])
    pooled = torch.cat([uncond.expand(batch).pooled, cond.pooled])

    def their_compute(transformer, j):
        return fg.train_sd3.compute_log_prob(transformer, pipe, sample, j, embeds, pooled, config)

    _compare_training(report, family, traj, cond, uncond, their_compute, log_probs, _perturbed(pipe.transformer))
    _last_step_difference(report, family, cond, uncond, x0, step_seed, traj)

    eval_family = copy.copy(family)
    eval_family.num_steps = family.eval_steps
    _, eval_seed, eval_draws = _noise(eval_family, batch, seed)
    eval_traj, _, _ = _apex_rollout(eval_family, pipe.transformer, cond, uncond, x0, eval_seed, sampler="ode")
    eval_latents, *_ = _their_sd3_rollout(
        fg, eval_family, cond, uncond, x0, eval_draws, noise_level=0, steps=family.eval_steps
    )
    report.compare(
        "sd3 eval", f"latents, {family.eval_steps} ODE steps", eval_traj.latents, torch.stack(eval_latents, 1)
    )


# ----------------------------------------------------------------------------- recipe pieces


def compare_advantages(fg: FlowGrpo, report: Report, *, groups: int = 4, group_size: int = 6, seed: int = 0) -> None:
    """Flow-GRPO's per-prompt advantages with the batch std (its FLUX and SD3 PickScore configs)
    against ``static`` on one objective: PickScore in raw units, which static divides by 26 as
    Flow-GRPO's scorer does."""
    gen = torch.Generator().manual_seed(seed)
    raw = 22 + torch.randn(groups * group_size, generator=gen, dtype=torch.float64)
    ids = torch.arange(groups).repeat_interleave(group_size)
    prompts = [f"prompt {int(g)}" for g in ids]
    theirs = fg.stat_tracking.PerPromptStatTracker(global_std=True).update(prompts, (raw / 26).numpy())
    ours, _ = build_balancer("static", ["pick"])(raw[:, None], ids)
    report.compare("recipe", "advantages (per-prompt mean, batch std)", ours, torch.as_tensor(theirs))


def measure_ema(fg: FlowGrpo, report: Report, micro_batches: int, gpus: int) -> None:
    """The weight the EMA gives a policy that moved at a qualifying optimizer step, past the warm-up.

    Flow-GRPO's loop calls ``ema.step(params, global_step)`` after every micro-batch, and
    ``global_step`` counts optimizer steps, so the last micro-batch of optimizer step n and the
    first ``micro_batches - 1`` of step n + 1 all pass n: a qualifying n is applied once per call
    (``micro_batches`` = the gradient-accumulation steps of its config). apex updates once."""
    p = torch.nn.Parameter(torch.zeros(1))
    theirs = fg.ema.EMAModuleWrapper([p], decay=0.9, update_step_interval=8)
    last = 159  # qualifies for Flow-GRPO ((n + 1) % 8 == 0), decay 0.9 from n = 80 on
    global_step = 0
    for n in range(1, last + 1):
        for i in range(micro_batches):
            if i == micro_batches - 1:  # the optimizer step: the policy moves, then global_step
                global_step += 1
                p.data.fill_(1.0 if n == last else 0.0)
            theirs.step([p], global_step)
    for _ in range(micro_batches - 1):  # step n + 1's first micro-batches still pass n
        theirs.step([p], global_step)

    p.data.zero_()
    ours = LoraEMA([p], 0.9, every=8, warmup=True)
    for n in range(1, 161):  # 160 qualifies for apex (n % 8 == 0)
        p.data.fill_(1.0 if n == 160 else 0.0)
        ours.update()
    report.measure(
        "recipe",
        f"EMA weight of a new policy, {micro_batches} micro-batches per step ({gpus} GPUs)",
        theirs.ema_parameters[0].item(),
        note=f"apex: {ours.shadow[0].item():.3f}",
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow-grpo", required=True, type=Path, help="a Flow-GRPO checkout (its repository root)")
    parser.add_argument("--family", choices=("flux", "sd3", "all"), default="all")
    parser.add_argument("--tol", type=float, default=1e-5, help="max |diff| allowed, relative above magnitude 1")
    parser.add_argument("--no-bf16", action="store_true", help="skip FLUX's bf16 measurements")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        fg = load_flow_grpo(args.flow_grpo)
    except NotACheckout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = run(fg, family=args.family, tol=args.tol, bf16=not args.no_bf16)
    report.print()
    failed = report.failed()
    if failed:
        print(f"\n{len(failed)} quantities differ by more than {args.tol:g}", file=sys.stderr)
        return 1
    print(f"\nevery checked quantity agrees within {args.tol:g}")
    return 0


def run(fg: FlowGrpo, *, family: str = "all", tol: float = 1e-5, bf16: bool = True) -> Report:
    """Every comparison of ``family`` (flux, sd3 or all), plus the family-independent ones."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting a loaded model does not apply here
    report = Report(tol)
    if family in ("flux", "all"):
        compare_flux(fg, report, bf16=bf16)
    if family in ("sd3", "all"):
        compare_sd3(fg, report)
    compare_advantages(fg, report)
    measure_ema(fg, report, micro_batches=6, gpus=32)
    measure_ema(fg, report, micro_batches=24, gpus=8)
    return report


if __name__ == "__main__":
    sys.exit(main())
