"""Where the time of one training iteration goes, on the tiny preset (CPU by default).

    python benchmarks/bench_train.py                    # tiny preset, 2 warm-up + 5 measured steps
    python benchmarks/bench_train.py --steps 10 --threads 2 sampling.num_steps=10

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
phase that ran them; the backward belongs to train; decode is all VAE) and the rest.

Model time is measured directly: forward pre/post hooks on the transformer (policy and reference
forwards), a wrapper around ``accelerator.backward`` (the transformer's backward; the loss
graph on top is a few element-wise ops), and a wrapper around ``vae.decode``. The probe's
per-objective ``autograd.grad`` passes are not wrapped: they count as outside-model time. The share
outside model forward/backward and VAE decode is ``1 - model / step`` (target: under 10%, as issue 6 sets for GPUs; under 15% on CPU).

Text encoding: the trainer embeds every prompt once at setup (``models.text_cache``) and frees
the encoders, so no iteration encodes text. To show what that removes, the script also times
encoding one iteration's prompts with the three text encoders (what an uncached loop pays every
step) against looking the same prompts up in the warm cache.

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
from apexcli.flow.rollout import unwrap_model
from apexcli.quiet import quiet_libraries
from apexcli.train.trainer import Trainer


class Clock:
    """Accumulates seconds per label; ``sync`` waits for the GPU so CUDA timings are real."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds


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
    starts: list[float] = []
    phase = ["other"]  # which trainer phase the forwards belong to

    def forward_done(*_):
        seconds = clock.now() - starts.pop()
        clock.add("model_forward", seconds)
        clock.add(f"model_forward/{phase[0]}", seconds)

    model.register_forward_pre_hook(lambda *_: starts.append(clock.now()))
    model.register_forward_hook(forward_done)
    for method, label in (("_sample", "sample"), ("_update", "train"), ("_probe", "probe")):
        original = getattr(trainer, method)

        def tagged(*args, _original=original, _label=label, **kwargs):
            phase[0] = _label
            try:
                return _original(*args, **kwargs)
            finally:
                phase[0] = "other"

        setattr(trainer, method, tagged)

    backward = trainer.accelerator.backward

    def timed_backward(loss, **kwargs):
        t0 = clock.now()
        backward(loss, **kwargs)
        clock.add("model_backward", clock.now() - t0)

    trainer.accelerator.backward = timed_backward

    decode = trainer.vae.decode

    def timed_decode(*args, **kwargs):
        t0 = clock.now()
        out = decode(*args, **kwargs)
        clock.add("vae_decode", clock.now() - t0)
        return out

    trainer.vae.decode = timed_decode
    trainer.balancer = TimedBalancer(trainer.balancer, clock)


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
    batches = [[prompts[(i * cfg.train.prompts_per_step + j) % len(prompts)] for j in range(cfg.train.prompts_per_step)] + [""]
               for i in range(repeats)]
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
    args = parser.parse_args()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve_config(
            preset=args.preset,
            options={"out": f"{tmp}/run", "objectives": args.objectives.split(",")},
            overrides=["logging.progress=false", "eval.every=0", *args.overrides],
        )
        trainer = Trainer(cfg, argv=["bench_train"])
        try:
            trainer.setup()
            clock = Clock(trainer.device)
            instrument(trainer, clock)
            per_step = []
            for i in range(args.warmup + args.steps):
                clock.seconds.clear()
                trainer.step += 1
                t0 = clock.now()
                row = trainer.train_step()
                total = clock.now() - t0
                if i >= args.warmup:
                    per_step.append((total, dict(clock.seconds), row))
        finally:
            trainer.close()

    text = time_text_encoding(cfg, trainer.prompts, repeats=max(args.steps, 3))

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
    print(
        f"preset {args.preset}: {t.prompts_per_step} prompts x {t.group_size} samples, {s.num_steps} steps, "
        f"{cfg.model.resolution} px, device {trainer.device}, {torch.get_num_threads()} threads; "
        f"{args.warmup} warm-up + {len(per_step)} measured iterations"
    )
    fwd_in = {name: mean([s.get(f"model_forward/{name}", 0.0) for _, s, _ in per_step]) for name in phases}
    model_in = dict(fwd_in)
    model_in["decode"] = vae
    model_in["train"] += bwd
    print(f"{'phase':<10} {'s/iter':>9} {'share':>7} {'model s':>9} {'outside s':>10}")
    for name, seconds in phases.items():
        print(f"{name:<10} {seconds:9.4f} {seconds / step:7.1%} {model_in[name]:9.4f} {seconds - model_in[name]:10.4f}")
    print(f"{'step':<10} {step:9.4f} {1:7.1%} {model:9.4f} {step - model:10.4f}")
    print()
    print(f"{'model':<18} {'s/iter':>9} {'share':>7}")
    for name, seconds in (("transformer fwd", fwd), ("transformer bwd", bwd), ("vae decode", vae)):
        print(f"{name:<18} {seconds:9.4f} {seconds / step:7.1%}")
    print(f"outside model fwd/bwd + VAE decode: {outside:.1%} of the iteration (target < 10%)")
    print(f"scoring thread time (overlapped with sampling): {mean([r['time/score'] for _, _, r in per_step]):.4f} s/iter")
    print(
        f"text encoding of one iteration's prompts: {text['uncached_s']:.4f} s uncached "
        f"({text['uncached_s'] / step:.1%} of an iteration) vs {text['cached_s']:.6f} s from the cache "
        f"({text['uncached_s'] / max(text['cached_s'], 1e-9):.0f}x); the trainer encodes once at setup"
    )
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(trainer.device),
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
                "text_encode_uncached_s": text["uncached_s"],
                "text_encode_cached_s": text["cached_s"],
            }
        )
    )


if __name__ == "__main__":
    main()
