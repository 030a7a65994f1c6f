"""How much of one update's policy gradient is signal: the number that says how many updates an
objective needs before GRPO can move it.

    python benchmarks/grad_signal.py                               # mini: brightness, appeal, adherence, ocr
    python benchmarks/grad_signal.py --objectives ocr --updates 24 --set train.prompts_per_step=4
    python benchmarks/grad_signal.py --objectives brightness --updates 32 --set train.loss=nft \
        --set sampling.share_group_noise=false --set train.experimental.nft_timesteps=4   # the nft loss's gradient

For each objective alone, the preset's training iteration is run ``--updates`` times at the *base*
model (the optimizer step is intercepted, so the LoRA never moves; anchor and KL are off, as both
have zero gradient there) and each iteration's LoRA gradient g_i is kept. With g_i = mu + e_i
(mu the expected gradient, e_i its batch noise):

    signal fraction  rho = mean_{i != j} cos(g_i, g_j)  ~  |mu|^2 / (|mu|^2 + E|e|^2)

rho near 1: every update points the same way; rho near 0: updates are mostly noise. Adam moves
the LoRA by about lr per step whatever the gradient, so the expected direction only outgrows
the random walk after roughly 1/rho updates (``updates_needed``), and more samples per update
raise rho (noise falls as 1/samples). ``rho_se`` is its jackknife standard error over the
updates. (Cosines rather than inner products: a few updates with large gradients would
otherwise decide the estimate.) Also printed: the cosine between the mean gradients of the two
halves of the updates, an estimate that needs no noise model. An iteration whose groups are all flat (every advantage 0)
has no gradient and is not counted, so ``updates`` can be below ``--updates``.

Each objective trains on the prompts it can score (``ocr``: the signs; ``adherence``: the
shapes; see ``PROMPTS``). Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

PROMPTS = {"ocr": "builtin:mini_signs", "adherence": "builtin:mini_shapes"}


def _mean_off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return (m.sum() - m.diagonal().sum()) / (n * (n - 1))


def signal_fraction(grads: torch.Tensor) -> dict[str, float]:
    """rho (with its jackknife standard error), updates_needed and the split-half cosine of
    per-update gradients [N, P]."""
    g = grads.double()
    unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cosines = unit @ unit.T
    n = g.shape[0]
    rho = float(_mean_off_diagonal(cosines))
    keep = [[j for j in range(n) if j != i] for i in range(n)]
    leave_one_out = torch.stack([_mean_off_diagonal(cosines[k][:, k]) for k in keep])
    se = float(((n - 1) / n * (leave_one_out - leave_one_out.mean()).square().sum()).sqrt())
    a, b = g[: n // 2].mean(0), g[n // 2 :].mean(0)
    halves = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
    return {
        "rho": rho,
        "rho_se": se,
        "updates_needed": (1.0 / rho) if rho > 0 else float("inf"),
        "half_cosine": halves,
        "grad_norm": float(g.norm(dim=1).mean()),
    }


def measure(preset: str, objective: str, updates: int, overrides: list[str], save: str = "") -> dict[str, float]:
    from apexcli.config import resolve_config
    from apexcli.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        settings = [
            f"objectives=[{objective}]",
            "balance.strategy=static",
            "eval.every=0",
            "train.checkpoint_every=0",
            "train.experimental.anchor_beta=0",
            "train.kl_beta=0",
            f"out={out}",
        ]
        if objective in PROMPTS:
            settings.append(f"prompts.train={PROMPTS[objective]}")
        cfg = resolve_config(preset=preset, overrides=settings + overrides)
        trainer = Trainer(cfg, overwrite=True, argv=["grad_signal"])
        trainer.setup()
        kept: list[torch.Tensor] = []

        def keep_gradient(*_args, **_kwargs) -> None:  # instead of the optimizer step: the LoRA stays at base
            kept.append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten()
                        for p in trainer.lora_params
                    ]
                ).cpu()
            )

        trainer.optimizer.step = keep_gradient
        t0 = time.perf_counter()
        for i in range(updates):
            trainer.step = i + 1
            trainer.train_step()
        seconds = time.perf_counter() - t0
        trainer.close()
    if save:  # the raw gradients, to re-estimate without rerunning: torch.load(path)
        torch.save(torch.stack(kept), f"{save}.{objective}.pt")
    result = signal_fraction(torch.stack(kept))
    result.update(
        samples_per_update=cfg.train.prompts_per_step * cfg.train.group_size,
        updates=len(kept),
        seconds_per_update=seconds / updates,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--objectives", default="brightness,appeal,adherence,ocr")
    parser.add_argument("--updates", type=int, default=16, help="independent updates per objective (>= 4)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument(
        "--save", default="", metavar="PREFIX", help="also write each objective's gradients to PREFIX.<objective>.pt"
    )
    args = parser.parse_args()
    if args.updates < 4:
        parser.error("--updates must be at least 4 (two halves of two)")

    from apexcli.quiet import quiet_libraries

    quiet_libraries()
    results = {}
    print(
        f"{'objective':12s} {'rho':>8s} {'± se':>7s} {'updates_needed':>15s} {'half_cosine':>12s} {'samples/update':>15s} {'s/update':>9s}"
    )
    for objective in [o.strip() for o in args.objectives.split(",") if o.strip()]:
        r = measure(args.preset, objective, args.updates, args.set, args.save)
        results[objective] = r
        print(
            f"{objective:12s} {r['rho']:8.4f} {r['rho_se']:7.4f} {r['updates_needed']:15.1f} {r['half_cosine']:12.3f} "
            f"{r['samples_per_update']:15d} {r['seconds_per_update']:9.1f}",
            flush=True,
        )
    print(json.dumps({"preset": args.preset, "overrides": args.set, "results": results}))


if __name__ == "__main__":
    main()
