"""Where the time of one training iteration goes, on the tiny preset (CPU by default).

    python benchmarks/bench_train.py                    # tiny preset, 2 warm-up + 5 measured steps
    python benchmarks/bench_train.py --steps 10 --threads 2 sampling.num_steps=10
    python benchmarks/bench_train.py --arch sd35m --preset sd35m-1gpu --warmup 1 --steps 2   # a GPU
    python benchmarks/bench_train.py --arch sd35m --preset sd35m-1gpu --smoke --warmup 0 --steps 1  # its CPU rehearsal
    python benchmarks/bench_train.py --arch flux1-dev --preset flux1-dev-1gpu --warmup 0 --steps 1  # a GPU, 12 B params

``--arch sd35m`` trains on SD3.5-Medium's real-shape fixture (``models.real_shape``: published
widths, 24 blocks, random weights), ``--arch flux1-dev`` on FLUX.1-dev's (19 double- + 38
single-stream blocks, 12 B parameters: 24 GB in bf16), and both print the iterations' peak memory
beside the plan of ``memory_plan.py``'s ``trainer_plan`` for the same config (in the JSON line:
``peak_gib``, ``memory_plan_gib``; where the plan does not cover the architecture, its one-line
reason in ``memory_plan_error``).

Runs the real ``Trainer`` (setup, then ``train_step`` as ``train()`` does, without checkpoints)
and times, per iteration:

  sample    rollouts (transformer forwards + SDE/ODE step math), VAE decode excluded
  decode    VAE decode of the final latents
  score     rewards on the critical path: the wait for the background scorer after the last
            rollout (scoring itself overlaps sampling; ``score_total`` is its own thread time)
  balancer  rewards -> advantages (pure tensor math)
  probe     the balancer's gradient probe, on the steps it runs
  train     the policy update (forwards, backward, optimizer)
  other     the rest of the step (planning, gathers, metrics)

Each phase row also shows how much of it is model time (transformer forwards tagged by the
phase that ran them, backward passes likewise; decode is all VAE) and the rest.

Model time is measured directly: forward pre/post hooks on the transformer (policy and reference
forwards), a wrapper around ``accelerator.backward`` (the transformer's backward; the loss
graph on top is a few element-wise ops), one around ``torch.autograd.grad`` while the gradient
probe runs (its per-objective backward passes), and one around ``vae.decode``. On CUDA these
spans are timed with CUDA events, never by synchronizing (which would add the launch gaps it
measures). The share outside model forward/backward and VAE decode is ``1 - model / step``
(target: under 10%).

Text encoding: the trainer embeds every prompt once at setup (``models.text_cache``) and frees
the encoders, so no iteration encodes text. To show what that removes, the script also times
encoding one iteration's prompts with the three text encoders (what an uncached loop pays every
step) against looking the same prompts up in the warm cache.

Per-step gradient share: after the measured iterations, one more batch is rolled out and, for
each trained denoising step t, the norm of the policy-gradient loss's gradient on the LoRA
weights, ``|| d/dtheta mean_i(-A_i exp(logp_i,t - logp_old_i,t)) ||``, is taken on its own;
``share_t = norm_t / sum_t norm_t``. It shows whether one step dominates the update (CPS scored
with the full Gaussian density: the last, smallest-std step does):

    python benchmarks/bench_train.py sampling.num_steps=10 sampling.sampler=cps_gaussian

The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict

import torch

from apexcli.config import resolve_config
from apexcli.flow.rollout import step_log_prob, unwrap_model
from apexcli.quiet import quiet_libraries
from apexcli.train.trainer import Trainer

# --smoke: a CPU in float32 at 64 px (16 image tokens), T5 length 16, 20 prompts to embed, 2 prompts x
# 2 samples, 3 steps of which 2 trained; with --arch sd35m one real-width transformer block, with
# --arch flux1-dev one double- and two single-stream blocks
SMOKE_OVERRIDES = [
    "model.device=cpu",
    "model.dtype=float32",
    "model.resolution=64",
    "model.max_sequence_length=16",
    "prompts.train=builtin:ocr",
    "train.prompts_per_step=2",
    "train.group_size=2",
    "train.rollout_batch_size=2",
    "train.train_batch_size=2",
    "sampling.num_steps=3",
    "train.window_size=2",
]


class Clock:
    """Accumulates seconds per label.

    Model spans (forward, backward, VAE decode) are timed without stalling the GPU: on CUDA each
    span records two events on the current stream and ``flush`` (once per iteration, after the
    iteration's own final sync) adds up their elapsed GPU time. Synchronizing at every span would
    itself add the launch gaps it is meant to measure. ``now`` (iteration boundaries, CPU-side
    phases) synchronizes on CUDA.
    """

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[tuple[str, ...], object, object]] = []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started, *labels: str) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((labels, started, end))
            return
        for label in labels:
            self.add(label, time.perf_counter() - started)

    def flush(self) -> None:
        """Add the GPU time of the spans recorded since the last flush (call after a sync)."""
        for labels, start, end in self._pending:
            for label in labels:
                self.add(label, start.elapsed_time(end) / 1000.0)
        self._pending.clear()


class TimedBalancer:
    """Delegates to the balancer; times its ``__call__`` (dunder calls bypass instance attributes)."""

    def __init__(self, balancer, clock: Clock):
        self._balancer, self._clock = balancer, clock

    def __call__(self, *args, **kwargs):
        t0 = self._clock.now()
        try:
            return self._balancer(*args, **kwargs)
        finally:
            self._clock.add("balancer", self._clock.now() - t0)

    def __getattr__(self, name):
        return getattr(self._balancer, name)


def instrument(trainer: Trainer, clock: Clock) -> None:
    model = unwrap_model(trainer.transformer)
    starts: list = []
    phase = ["other"]  # which trainer phase the forwards belong to

    model.register_forward_pre_hook(lambda *_: starts.append(clock.start()))
    model.register_forward_hook(lambda *_: clock.stop(starts.pop(), "model_forward", f"model_forward/{phase[0]}"))
    grad = torch.autograd.grad

    def timed_grad(*args, **kwargs):  # the probe's backward passes
        started = clock.start()
        out = grad(*args, **kwargs)
        clock.stop(started, "model_backward", f"model_backward/{phase[0]}")
        return out

    for method, label in (("_sample", "sample"), ("_update", "train"), ("_probe", "probe")):
        original = getattr(trainer, method)

        def tagged(*args, _original=original, _label=label, **kwargs):
            phase[0] = _label
            if _label == "probe":
                torch.autograd.grad = timed_grad
            try:
                return _original(*args, **kwargs)
            finally:
                phase[0] = "other"
                torch.autograd.grad = grad

        setattr(trainer, method, tagged)

    backward = trainer.accelerator.backward

    def timed_backward(loss, **kwargs):
        started = clock.start()
        backward(loss, **kwargs)
        clock.stop(started, "model_backward", f"model_backward/{phase[0]}")

    trainer.accelerator.backward = timed_backward

    decode = trainer.vae.decode

    def timed_decode(*args, **kwargs):
        started = clock.start()
        out = decode(*args, **kwargs)
        clock.stop(started, "vae_decode")
        return out

    trainer.vae.decode = timed_decode
    trainer.balancer = TimedBalancer(trainer.balancer, clock)


def step_gradient_shares(trainer: Trainer) -> dict[int, float]:
    """Share of each trained step in the summed gradient norm of one fresh batch (see the docstring)."""
    from apexcli.train.sampler import plan_step

    cfg = trainer.cfg
    trainer.step += 1
    plan = plan_step(
        step=trainer.step,
        seed=cfg.seed,
        num_prompts=len(trainer.prompts),
        prompts_per_step=cfg.train.prompts_per_step,
        group_size=cfg.train.group_size,
        rank=0,
        world_size=1,
    )
    trainer.transformer.eval()
    trajectories, rewards, _ = trainer._sample(plan)
    advantages, _ = trainer.balancer(rewards, plan.group_ids)
    model = unwrap_model(trainer.transformer)
    n = sum(len(traj) for traj in trajectories)
    summed: dict[int, list[torch.Tensor]] = {}  # gradient of the batch-mean loss at step t
    start = 0
    for traj in trajectories:
        rows = list(range(start, start + len(traj)))
        start += len(traj)
        cond = trainer.embeds.index([plan.prompt_ids[i] for i in rows]).to(trainer.device)
        adv = advantages[rows].to(trainer.device)
        for t in trainer.steps_trained:
            x, x_next, sigma, sigma_next = traj.transition(t)
            out = step_log_prob(
                model,
                x,
                x_next,
                sigma,
                sigma_next,
                cond,
                guidance_scale=cfg.sampling.guidance_scale,
                uncond=trainer.uncond,
                **traj.step_options,
            )
            loss = -(adv * torch.exp(out.log_prob - traj.log_probs[:, t])).sum() / n
            grads = torch.autograd.grad(loss, trainer.lora_params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(trainer.lora_params, grads)]
            summed[t] = grads if t not in summed else [a + g for a, g in zip(summed[t], grads)]
    norms = {
        t: float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])))
        for t, grads in summed.items()
    }
    total = sum(norms.values())
    return {t: (v / total if total > 0 else 0.0) for t, v in norms.items()}


ARCHS = {"sd35m": "the SD3.5-M", "flux1-dev": "the FLUX.1-dev"}
"""The real-shape fixtures ``--arch`` trains on."""

DEFAULT_LAYERS = {"sd35m": 24, "flux1-dev": 19}
"""The releases' depths: SD3.5-M's blocks, FLUX.1-dev's double-stream blocks (and twice as many
single-stream ones)."""


def transformer_config(arch: str, layers: int) -> dict:
    """The fixture's transformer config: ``layers`` SD3.5-M blocks, or FLUX.1-dev's ``layers``
    double- and ``2 * layers`` single-stream blocks (the release's ratio, 19 and 38)."""
    from apexcli.models.real_shape import real_shape_flux_config, real_shape_transformer_config

    if arch == "flux1-dev":
        return real_shape_flux_config(layers, 2 * layers)
    return real_shape_transformer_config(arch, layers)


def real_shape_pipeline(cfg, dtype: torch.dtype, arch: str, layers: int):
    """The real-shape fixture of ``arch`` (``models.real_shape``: published widths, tokenizer
    lengths and special ids, random weights) at the depth of ``transformer_config`` and one layer
    per text encoder, built on the GPU when the config trains on one. The encoders only condition
    the model: the trainer embeds the prompts once and frees them, so their depth does not enter
    an iteration. No download."""
    from apexcli.models.real_shape import build_real_shape_flux, build_real_shape_sd3

    device = "cuda" if torch.cuda.is_available() and cfg.model.device != "cpu" else "cpu"
    if arch == "flux1-dev":
        config = transformer_config(arch, layers)
        return build_real_shape_flux(
            num_layers=config["num_layers"],
            num_single_layers=config["num_single_layers"],
            text_layers=1,
            seed=cfg.seed,
            dtype=dtype,
            device=device,
        )
    return build_real_shape_sd3(arch, num_layers=layers, text_layers=1, seed=cfg.seed, dtype=dtype, device=device)


def memory_plan_gib(cfg, arch: str, layers: int) -> tuple[dict[str, float] | None, str | None]:
    """``memory_plan.trainer_plan`` (GiB) for this config on the transformer that was trained, or
    None and the plan's one-line reason where it does not cover the architecture."""
    from apexcli.errors import ApexError
    from memory_plan import trainer_plan

    try:
        plan = trainer_plan(cfg, transformer_config(arch, layers))
    except ApexError as exc:
        return None, str(exc)
    return {k: v / 2**30 for k, v in plan.items()}, None


def time_text_encoding(cfg, prompts: list[str], repeats: int) -> dict[str, float]:
    """Seconds to embed one iteration's prompts (+ the empty prompt): fresh vs from a warm cache."""
    from apexcli.models.loading import load_pipeline
    from apexcli.models.text_cache import (
        TextEmbeddingCache,
        encode_prompts,
        encoder_fingerprint,
    )

    pipe = load_pipeline(cfg.model)
    seq = cfg.model.max_sequence_length
    cache = TextEmbeddingCache(None, encoder_fingerprint(pipe))
    batches = [
        [prompts[(i * cfg.train.prompts_per_step + j) % len(prompts)] for j in range(cfg.train.prompts_per_step)] + [""]
        for i in range(repeats)
    ]
    encode_prompts(pipe, batches[0], max_sequence_length=seq, device="cpu")  # warm-up
    t0 = time.perf_counter()
    for batch in batches:
        encode_prompts(pipe, batch, max_sequence_length=seq, device="cpu")
    uncached = (time.perf_counter() - t0) / repeats
    for batch in batches:
        encode_prompts(pipe, batch, max_sequence_length=seq, device="cpu", cache=cache)
    t0 = time.perf_counter()
    for batch in batches:
        encode_prompts(pipe, batch, max_sequence_length=seq, device="cpu", cache=cache)
    cached = (time.perf_counter() - t0) / repeats
    return {"uncached_s": uncached, "cached_s": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE on top of the preset")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--objectives", default="brightness,colorfulness")
    parser.add_argument("--warmup", type=int, default=2, help="iterations run before measuring")
    parser.add_argument("--steps", type=int, default=5, help="measured iterations")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument(
        "--arch",
        choices=["preset", *ARCHS],
        default="preset",
        help="sd35m / flux1-dev: the preset's config on SD3.5-Medium's / FLUX.1-dev's real-shape fixture, "
        "random weights (no download; for GPUs, e.g. --preset sd35m-1gpu / flux1-dev-1gpu)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks with --arch sd35m (default 24, the release), double-stream blocks with --arch "
        "flux1-dev (default 19, the release; single-stream: twice as many); 1 with --smoke",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CPU, float32, 64 px, 2 x 2 samples, 3 steps: the same code paths in seconds",
    )
    args = parser.parse_args()
    layers = args.layers or (1 if args.smoke else DEFAULT_LAYERS.get(args.arch, 0))
    fixture = args.arch in ARCHS
    blocks = None  # the fixture's depth: num_layers (and FLUX's num_single_layers)
    if fixture:
        config = transformer_config(args.arch, layers)
        blocks = {k: config[k] for k in ("num_layers", "num_single_layers") if k in config}
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(
            preset=args.preset,
            options={"out": f"{tmp}/run", "objectives": args.objectives.split(",")},
            overrides=[
                "logging.progress=false",
                "eval.every=0",
                *(SMOKE_OVERRIDES if args.smoke else []),
                *args.overrides,
            ],
        )
        if fixture:
            import apexcli.train.setup as setup_module
            from apexcli.models.loading import DTYPES

            setup_module.load_pipeline = lambda model_cfg: real_shape_pipeline(
                cfg, DTYPES[model_cfg.dtype], args.arch, layers
            )
            # apex doctor's model row looks for the released weights: built in code here
            setup_module.preflight = lambda cfg: None
        trainer = Trainer(cfg, argv=["bench_train"])
        try:
            trainer.setup()
            if trainer.device.type == "cuda":  # the peak of the iterations, not of building fp32 weights
                torch.cuda.reset_peak_memory_stats(trainer.device)
            clock = Clock(trainer.device)
            instrument(trainer, clock)
            per_step = []
            for i in range(args.warmup + args.steps):
                clock.seconds.clear()
                trainer.step += 1
                t0 = clock.now()
                row = trainer.train_step()
                total = clock.now() - t0
                clock.flush()
                if i >= args.warmup:
                    per_step.append((total, dict(clock.seconds), row))
            shares = step_gradient_shares(trainer)
        finally:
            trainer.close()

    # the random architecture's one-layer encoders would say nothing about T5-XXL's cost
    text = time_text_encoding(cfg, trainer.prompts, repeats=max(args.steps, 3)) if args.arch == "preset" else None
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if trainer.device.type == "cuda" else None
    plan, plan_error = memory_plan_gib(cfg, args.arch, layers) if fixture else (None, None)

    def mean(values) -> float:
        return statistics.fmean(values) if values else 0.0

    step = mean([t for t, _, _ in per_step])
    fwd = mean([s.get("model_forward", 0.0) for _, s, _ in per_step])
    bwd = mean([s.get("model_backward", 0.0) for _, s, _ in per_step])
    vae = mean([s.get("vae_decode", 0.0) for _, s, _ in per_step])
    balancer = mean([s.get("balancer", 0.0) for _, s, _ in per_step])
    sample_total = mean([r["time/sample"] for _, _, r in per_step])  # rollouts + decode
    phases = {
        "sample": sample_total - vae,
        "decode": vae,
        "score": mean([r["time/score_wait"] for _, _, r in per_step]),
        "balancer": balancer,
        "probe": mean([r["time/probe"] for _, _, r in per_step]),
        "train": mean([r["time/train"] for _, _, r in per_step]),
    }
    phases["other"] = step - sum(phases.values())
    model = fwd + bwd + vae
    outside = 1.0 - model / step if step > 0 else float("nan")

    t, s = cfg.train, cfg.sampling
    arch = ""
    if blocks is not None:
        depth = f"{layers} blocks"
        if "num_single_layers" in blocks:
            depth = f"{blocks['num_layers']} double- + {blocks['num_single_layers']} single-stream blocks"
        arch = f" on {ARCHS[args.arch]} real-shape fixture ({depth}, random weights)"
    print(
        f"preset {args.preset}{arch}: {t.prompts_per_step} prompts x {t.group_size} samples, {s.num_steps} steps, "
        f"{cfg.model.resolution} px, device {trainer.device}, {torch.get_num_threads()} threads; "
        f"{args.warmup} warm-up + {len(per_step)} measured iterations"
    )
    fwd_in = {name: mean([s.get(f"model_forward/{name}", 0.0) for _, s, _ in per_step]) for name in phases}
    bwd_in = {name: mean([s.get(f"model_backward/{name}", 0.0) for _, s, _ in per_step]) for name in phases}
    model_in = {name: fwd_in[name] + bwd_in[name] for name in phases}
    model_in["decode"] = vae
    print(f"{'phase':<10} {'s/iter':>9} {'share':>7} {'model s':>9} {'outside s':>10}")
    for name, seconds in phases.items():
        print(f"{name:<10} {seconds:9.4f} {seconds / step:7.1%} {model_in[name]:9.4f} {seconds - model_in[name]:10.4f}")
    print(f"{'step':<10} {step:9.4f} {1:7.1%} {model:9.4f} {step - model:10.4f}")
    print()
    print(f"{'model':<18} {'s/iter':>9} {'share':>7}")
    for name, seconds in (("transformer fwd", fwd), ("transformer bwd", bwd), ("vae decode", vae)):
        print(f"{name:<18} {seconds:9.4f} {seconds / step:7.1%}")
    print(f"outside model fwd/bwd + VAE decode: {outside:.1%} of the iteration (target < 10%)")
    print(
        f"scoring thread time (overlapped with sampling): {mean([r['time/score'] for _, _, r in per_step]):.4f} s/iter"
    )
    print(
        f"gradient share per trained step ({s.sampler}, {s.num_steps} steps, noise level {s.noise_level}): "
        + " ".join(f"t{t}={v:.1%}" for t, v in shares.items())
    )
    if text is not None:
        print(
            f"text encoding of one iteration's prompts: {text['uncached_s']:.4f} s uncached "
            f"({text['uncached_s'] / step:.1%} of an iteration) vs {text['cached_s']:.6f} s from the cache "
            f"({text['uncached_s'] / max(text['cached_s'], 1e-9):.0f}x); the trainer encodes once at setup"
        )
    measured = f"{peak:.2f} GiB" if peak is not None else f"not measured on {trainer.device.type}"
    if plan_error is not None:
        print(
            f"peak memory of the iterations (torch.cuda.max_memory_allocated): {measured}; memory_plan.py: {plan_error}"
        )
    if plan is not None:
        print(
            f"peak memory of the iterations (torch.cuda.max_memory_allocated): {measured}; "
            f"memory_plan.py plans {plan['total']:.2f} GiB (transformer {plan['transformer']:.2f}, "
            f"train activations {plan['activations_train']:.2f}, the rest {plan['total'] - plan['transformer'] - plan['activations_train']:.2f}) "
            "+ the transient rollout/decode working sets"
        )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "arch": args.arch,
                "layers": layers if fixture else None,
                "transformer_blocks": blocks,
                "device": str(trainer.device),
                "peak_gib": peak,
                "memory_plan_gib": plan,
                "memory_plan_error": plan_error,
                "threads": torch.get_num_threads(),
                "iterations": len(per_step),
                "step_s": step,
                "phases_s": phases,
                "model_forward_s": fwd,
                "model_backward_s": bwd,
                "vae_decode_s": vae,
                "score_thread_s": mean([r["time/score"] for _, _, r in per_step]),
                "model_s_by_phase": model_in,
                "outside_model_share": outside,
                "text_encode_uncached_s": text["uncached_s"] if text else None,
                "text_encode_cached_s": text["cached_s"] if text else None,
                "sampler": s.sampler,
                "step_gradient_share": {str(t): v for t, v in shares.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
