"""Statistics of the objectives on a base model: the numbers that make balancing matter.

    python benchmarks/mini_stats.py                          # the mini preset's base model
    python benchmarks/mini_stats.py --set model.pretrained=/path/to/snapshot --prompts 64 --groups 16

Two views, both from the preset's own settings:

  eval   the first --prompts held-out prompts, one image each, with the evaluation's fixed noise,
         ODE sampler, steps and guidance (exactly what `apex train` evaluates at step 0):
         per objective mean, std over prompts (the `base_std` unit of `apex pareto` and
         bench_balance), and the correlation matrix over the images where both are defined.
  group  --groups training prompts x the preset's group size, sampled as a training rollout
         (the SDE sampler, noise level and guidance of `sampling`, shared group noise if set):
         per objective the mean within-group std (what GRPO learns from, and what decides
         who hijacks a static weighted sum) and the correlation of the within-group deviations
         r - mean_group(r) (the conflict a shared update faces).
  steps  with --per-step: the group view again once per step k, only step k stochastic (the
         rest ODE, one starting noise per group): which step's noise makes the within-group spread
         GRPO learns from. The steps that make none of it only add noise to the gradient, which
         is what `train.window_start` / `train.window_size` leave out.

Prints tables and, as its last line, one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch


def corr_matrix(values: np.ndarray) -> list[list[float | None]]:
    """Pearson correlation of each pair of columns over the rows where both are finite."""
    k = values.shape[1]
    out: list[list[float | None]] = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            both = np.isfinite(values[:, i]) & np.isfinite(values[:, j])
            a, b = values[both, i], values[both, j]
            if both.sum() >= 3 and a.std() > 0 and b.std() > 0:
                out[i][j] = float(np.corrcoef(a, b)[0, 1])
    return out


def column_stats(values: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    stats = {}
    for k, name in enumerate(names):
        col = values[:, k][np.isfinite(values[:, k])]
        stats[name] = {
            "n": int(col.size),
            "mean": float(col.mean()) if col.size else math.nan,
            "std": float(col.std()) if col.size > 1 else math.nan,
        }
    return stats


def print_matrix(title: str, names: list[str], matrix: list[list[float | None]]) -> None:
    print(title)
    print(" " * 12 + "".join(f"{n:>11s}" for n in names))
    for name, row in zip(names, matrix):
        print(f"{name:>12s}" + "".join(f"{'-' if v is None else f'{v:+.3f}':>11s}" for v in row))
    print()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--objectives", default="", help="comma-separated; default: the preset's objectives")
    parser.add_argument("--prompts", type=int, default=64, help="eval view: held-out prompts (0 skips the view)")
    parser.add_argument("--groups", type=int, default=16, help="group view: training prompts (0 skips the view)")
    parser.add_argument(
        "--per-step", action="store_true", help="also the within-group std with one stochastic step at a time"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    args = parser.parse_args()

    from apexcli.config import resolve_config
    from apexcli.flow.rollout import decode_latents, initial_noise, rollout
    from apexcli.models.loading import load_pipeline, resolve_device
    from apexcli.models.text_cache import encode_prompts
    from apexcli.prompts import load_prompts
    from apexcli.quiet import quiet_libraries
    from apexcli.rewards import RewardSuite
    from apexcli.seeds import mix_seed

    quiet_libraries()
    cfg = resolve_config(preset=args.preset, overrides=args.set)
    names = [o.strip() for o in args.objectives.split(",") if o.strip()] or list(cfg.objectives)
    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model).to(device)
    res, seq = cfg.model.resolution, cfg.model.max_sequence_length
    latent = res // pipe.vae_scale_factor
    shape = (pipe.transformer.config.in_channels, latent, latent)
    uncond = encode_prompts(pipe, [cfg.sampling.negative_prompt], max_sequence_length=seq, device=device)
    suite = RewardSuite(names, device=device, config=cfg.rewards)
    summary: dict = {"preset": args.preset, "pretrained": cfg.model.pretrained, "objectives": suite.objectives}
    print(f"model {cfg.model.pretrained}, objectives {', '.join(suite.objectives)}\n")

    def sample(
        prompts: list[str],
        noise: torch.Tensor,
        *,
        steps: int,
        guidance: float,
        sampler: str,
        generator: torch.Generator | None = None,
        sde_steps: list[int] | None = None,
    ) -> tuple[np.ndarray, float]:
        cond = encode_prompts(pipe, prompts, max_sequence_length=seq, device=device)
        rows, t_score = [], 0.0
        bs = cfg.eval.batch_size
        for start in range(0, len(prompts), bs):
            idx = list(range(start, min(start + bs, len(prompts))))
            traj = rollout(
                pipe.transformer,
                pipe.scheduler,
                cond.index(idx),
                num_steps=steps,
                height=res,
                width=res,
                vae_scale_factor=pipe.vae_scale_factor,
                guidance_scale=guidance,
                uncond=uncond,
                sampler=sampler,
                noise_level=cfg.sampling.noise_level,
                initial_noise=noise[idx],
                generator=generator,
                sde_steps=sde_steps,
                noise_block=cfg.sampling.experimental.noise_block if sampler == "sde" else 1,
            )
            images = decode_latents(pipe.vae, traj.final)
            t0 = time.perf_counter()
            r, _ = suite(images, [prompts[i] for i in idx])
            t_score += time.perf_counter() - t0
            rows.append(r.numpy())
        return np.concatenate(rows).astype(np.float64), t_score

    k = len(suite.objectives)
    if args.prompts > 0:
        prompts = load_prompts(cfg.prompts.eval)[: args.prompts]
        noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(cfg.eval.seed, i)))
                for i in range(len(prompts))
            ]
        )
        t0 = time.perf_counter()
        R, t_score = sample(prompts, noise, steps=cfg.eval.num_steps, guidance=cfg.eval.guidance_scale, sampler="ode")
        stats = column_stats(R, suite.objectives)
        stds = {n: s["std"] for n, s in stats.items() if math.isfinite(s["std"]) and s["std"] > 0}
        loud, quiet = max(stds, key=stds.get), min(stds, key=stds.get)
        corr = corr_matrix(R)
        print(
            f"eval view: {len(prompts)} held-out prompts x 1 image, ODE {cfg.eval.num_steps} steps, "
            f"CFG {cfg.eval.guidance_scale} ({time.perf_counter() - t0:.0f} s, scoring {t_score:.1f} s)"
        )
        print(f"{'objective':>12s} {'n':>5s} {'mean':>9s} {'std':>9s}")
        for n, s in stats.items():
            print(f"{n:>12s} {s['n']:>5d} {s['mean']:>9.4f} {s['std']:>9.4f}")
        print(f"loudest / quietest std: {loud} / {quiet} = {stds[loud] / stds[quiet]:.1f}x\n")
        print_matrix("correlation over images (pairwise complete)", suite.objectives, corr)
        summary["eval"] = {
            "prompts": len(prompts),
            "stats": stats,
            "std_ratio": stds[loud] / stds[quiet],
            "loudest": loud,
            "quietest": quiet,
            "corr": corr,
        }

    if args.groups > 0:
        g = cfg.train.group_size
        base = load_prompts(cfg.prompts.train)
        rng = np.random.default_rng(cfg.seed)
        chosen = [base[i] for i in rng.choice(len(base), size=min(args.groups, len(base)), replace=False)]
        prompts = [p for p in chosen for _ in range(g)]
        group_ids = torch.arange(len(chosen)).repeat_interleave(g)
        gen = torch.Generator().manual_seed(cfg.seed)
        noise = initial_noise(
            len(prompts),
            shape,
            generator=gen,
            group_ids=group_ids,
            share_within_group=cfg.sampling.share_group_noise,
            device="cpu",
        )
        t0 = time.perf_counter()
        R, _ = sample(
            prompts,
            noise,
            steps=cfg.sampling.num_steps,
            guidance=cfg.sampling.guidance_scale,
            sampler=cfg.sampling.sampler,
            generator=gen,
        )
        Rg = R.reshape(len(chosen), g, k)
        with np.errstate(invalid="ignore"):
            within = np.nanstd(Rg, axis=1)  # [G, K]; NaN for groups an objective does not apply to
            dev = (Rg - np.nanmean(Rg, axis=1, keepdims=True)).reshape(-1, k)
        within_std = {n: float(np.nanmean(within[:, j])) for j, n in enumerate(suite.objectives)}
        flat_groups = {
            n: float(np.mean(within[np.isfinite(within[:, j]), j] < 1e-6)) for j, n in enumerate(suite.objectives)
        }
        corr_w = corr_matrix(dev)
        print(
            f"group view: {len(chosen)} training prompts x {g}, {cfg.sampling.sampler} {cfg.sampling.num_steps} steps, "
            f"CFG {cfg.sampling.guidance_scale}, shared noise {cfg.sampling.share_group_noise} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
        print(f"{'objective':>12s} {'within std':>11s} {'flat groups':>12s}")
        for n in suite.objectives:
            print(f"{n:>12s} {within_std[n]:>11.4f} {flat_groups[n]:>12.2f}")
        ws = {n: v for n, v in within_std.items() if math.isfinite(v) and v > 0}
        ratio = max(ws.values()) / min(ws.values()) if ws else math.nan
        print(f"loudest / quietest within-group std: {ratio:.1f}x\n")
        print_matrix("correlation of within-group deviations", suite.objectives, corr_w)
        summary["group"] = {
            "prompts": len(chosen),
            "group_size": g,
            "within_std": within_std,
            "flat_group_frac": flat_groups,
            "std_ratio": ratio,
            "corr": corr_w,
        }
        if args.per_step:
            # one starting noise per group whatever the config says: only the one step differs
            shared = initial_noise(
                len(prompts),
                shape,
                generator=torch.Generator().manual_seed(cfg.seed),
                group_ids=group_ids,
                share_within_group=True,
                device="cpu",
            )
            per_step = {}
            print(f"{'stochastic step':>15s}" + "".join(f"{n:>11s}" for n in suite.objectives))
            for step in range(cfg.sampling.num_steps - 1):  # the last step is never stochastic in training
                gen = torch.Generator().manual_seed(cfg.seed + 1 + step)
                R, _ = sample(
                    prompts,
                    shared,
                    steps=cfg.sampling.num_steps,
                    guidance=cfg.sampling.guidance_scale,
                    sampler=cfg.sampling.sampler,
                    generator=gen,
                    sde_steps=[step],
                )
                with np.errstate(invalid="ignore"):
                    spread = np.nanstd(R.reshape(len(chosen), g, k), axis=1)
                per_step[step] = {n: float(np.nanmean(spread[:, j])) for j, n in enumerate(suite.objectives)}
                print(f"{step:>15d}" + "".join(f"{per_step[step][n]:>11.4f}" for n in suite.objectives))
            print()
            summary["group"]["within_std_one_stochastic_step"] = per_step
    suite.close()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
