"""Compare the balancing strategies on the synthetic testbed (pure torch, CPU, about a minute).

    python benchmarks/bench_balance.py --seeds 5

For each strategy and seed, trains the Gaussian policy of ``apexcli.balance.testbed`` (default
task: a loud high-variance reward, a quiet low-variance one and a sparse binary one, partly
conflicting) and reports, averaged over seeds:

  gains        per objective, (J_k(final) - J_k(start)) / (J_k(best for k) - J_k(start))
               (0 = no change, 1 = as good as training on k alone, < 0 = regressed)
  hypervolume  moocore.hypervolume of the checkpoints (every eval_every steps) in that
               normalized, maximized space, reference point = the initial policy (the origin)
  hv_final     the same for the final checkpoint alone

Every strategy runs with its library defaults (BalanceConfig()) and the same seeds, task and
optimizer. The last line is one JSON object keyed by strategy name (``--apex-ablation`` adds
keys such as ``apex[b_lp=0,b_cp=0]``: P³ with only the progress-need term).

    python benchmarks/bench_balance.py --tiny --seeds 3

runs the same comparison on the tiny diffusion preset instead (real rollouts, GRPO updates and
the toy rewards brightness, compressibility, contrast): every strategy at equal steps and
seeds, evaluated with the held-out ODE evaluation at step 0 and at the end. There a gain is
(eval mean at the end - at step 0) / (std of the step-0 eval scores across prompts), and the
hypervolume is that of the final point with the step-0 point as reference, in the same units.
Each strategy's JSON entry also has its per-seed gains and, with static among the strategies and
more than one seed, `vs_static`: per objective, the mean and standard error of its gain minus
static's, paired by seed (runs with one seed draw the same prompts and noise).

    python benchmarks/bench_balance.py --mini --seeds 3 --steps 20
    python benchmarks/bench_balance.py --mini --objectives ocr --strategies static --seeds 3

does the same on the `mini` preset (the pretrained miniature world; objectives adherence,
quality, appeal, ocr by default). Its JSON adds, per strategy: the raw eval means at step 0
and at the end, the raw gain's mean and seed-to-seed std (`gain_raw`, `gain_raw_seed_std`:
a single-objective run works when the mean gain clearly exceeds that noise), and `share`: each
objective's mean `balance/share/{k}` over the training steps (its explained share of the
advantage; a static run hijacked by one objective shows it near 1).
`--set KEY=VALUE` (repeatable) overrides the preset in every run (e.g. a model snapshot).
`--jobs N` runs N of the runs at once, each in its own one-thread process (`--jobs 2` halves the
wall time on two cores; the numbers are the same as in one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from apexcli.balance import BALANCERS
from apexcli.balance.testbed import Evaluator, TrainSettings, default_task, hypervolume, train_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per strategy (0..seeds-1)")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="policy updates per run")
    parser.add_argument("--strategies", default=",".join(BALANCERS), help="comma-separated strategies to compare")
    parser.add_argument(
        "--apex-ablation",
        action="store_true",
        help="also run apex with each subset of the P³ terms (the others' coefficients 0), rho=0 (no DSAN floor) and probe_every=0",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="compare on the tiny diffusion preset instead of the testbed"
    )
    parser.add_argument(
        "--objectives",
        default="",
        help="--tiny / --mini: rewards to train on (default: brightness,compressibility,contrast / adherence,quality,appeal,ocr)",
    )
    parser.add_argument(
        "--mini", action="store_true", help="compare on the pretrained mini preset instead of the testbed"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="--tiny / --mini: config override for every run, repeatable",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="--tiny / --mini: runs at once, each in its own process with one thread (default 1: in this process)",
    )
    args = parser.parse_args()
    if args.tiny or args.mini:
        tiny_main(args, "mini" if args.mini else "tiny")
        return
    torch.set_num_threads(1)

    task = default_task()
    settings = TrainSettings(steps=args.steps)
    evaluator = Evaluator(task, settings.eval_samples)
    names = task.names
    print(
        f"task: {', '.join(names)}; start J = {[round(x, 4) for x in evaluator.start.tolist()]}, best J = {[round(x, 4) for x in evaluator.best.tolist()]}"
    )
    print(f"settings: {settings}; seeds 0..{args.seeds - 1}; every strategy at its BalanceConfig defaults\n")
    header = (
        f"{'strategy':20s} {'hypervolume':>16s} {'hv_final':>9s} "
        + " ".join(f"{'gain/' + n:>14s}" for n in names)
        + f" {'s/run':>6s}"
    )
    print(header)
    summary: dict[str, dict] = {}
    runs: list[tuple[str, str, dict]] = [(s.strip(), s.strip(), {}) for s in args.strategies.split(",") if s.strip()]
    if args.apex_ablation:
        for kept in ("", "lp", "cp", "pn", "lp,cp", "lp,pn", "cp,pn"):
            off = [term for term in ("lp", "cp", "pn") if term not in kept.split(",")]
            runs.append(
                (f"apex[{','.join(f'b_{term}=0' for term in off)}]", "apex", {f"b_{term}": 0.0 for term in off})
            )
        runs.append(("apex[rho=0]", "apex", {"rho": 0.0}))
        runs.append(("apex[probe_every=0]", "apex", {"probe_every": 0}))
    for label, strategy, options in runs:
        t0 = time.perf_counter()
        hv, hv_final, gains = [], [], []
        for seed in range(args.seeds):
            result = train_policy(task, strategy, seed, settings, evaluator=evaluator, **options)
            hv.append(hypervolume(result.points))
            hv_final.append(hypervolume(result.points[-1:]))
            gains.append(result.gains)
        per_run = (time.perf_counter() - t0) / args.seeds
        g = torch.stack(gains)
        mean_gains = {n: float(g[:, i].mean()) for i, n in enumerate(names)}
        summary[label] = {
            "hypervolume": statistics.fmean(hv),
            "hypervolume_std": statistics.pstdev(hv),
            "hypervolume_final": statistics.fmean(hv_final),
            "gains": mean_gains,
            "all_improved_frac": float((g > 0).all(1).double().mean()),
        }
        cells = " ".join(f"{mean_gains[n]:>14.3f}" for n in names)
        print(
            f"{label:20s} {statistics.fmean(hv):>8.4f} ± {statistics.pstdev(hv):<6.4f} {statistics.fmean(hv_final):>9.4f} {cells} {per_run:>6.2f}"
        )
    if "apex" in summary and "static" in summary:
        ratio = summary["apex"]["hypervolume"] - summary["static"]["hypervolume"]
        print(f"\napex - static hypervolume: {ratio:+.4f}")
    print(json.dumps(summary))


def tiny_main(args, preset: str = "tiny") -> None:
    import tempfile
    from pathlib import Path

    import numpy as np

    from apexcli.config import resolve_config
    from apexcli.eval.pareto import hypervolume as hv_of
    from apexcli.runs import RunDir

    default_steps = resolve_config(preset=preset, overrides=args.set).train.steps
    steps = args.steps if args.steps != TrainSettings.steps else default_steps
    default_objectives = "adherence,quality,appeal,ocr" if preset == "mini" else "brightness,compressibility,contrast"
    names = [o.strip() for o in (args.objectives or default_objectives).split(",") if o.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    print(
        f"{preset} preset, objectives {names}, {steps} steps, seeds 0..{args.seeds - 1}, eval at step 0 and {steps}\n"
    )
    print(
        f"{'strategy':12s} {'hypervolume':>12s} " + " ".join(f"{'gain/' + n:>20s}" for n in names) + f" {'s/run':>7s}"
    )
    summary: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            (strategy, seed): dict(
                preset=preset,
                options={
                    "objectives": names,
                    "seed": seed,
                    "out": str(Path(tmp) / f"{strategy}-{seed}"),
                    "balance": {"strategy": strategy},
                    "train": {"steps": steps, "checkpoint_every": 0, "keep_checkpoints": 1},
                    "eval": {"every": steps},
                    "logging": {"progress": False},
                },
                overrides=args.set,
                argv=["bench_balance", f"--{preset}"],
            )
            for strategy in strategies
            for seed in range(args.seeds)
        }
        seconds = _run_all(runs, args.jobs)
        for strategy in strategies:
            gains, hvs, raw, shares, base_means, final_means = [], [], [], [], [], []
            for seed in range(args.seeds):
                out = Path(runs[strategy, seed]["options"]["out"])
                all_rows = RunDir(out).read_metrics().rows
                rows = [r for r in all_rows if r["kind"] == "eval"]
                base, final = rows[0], rows[-1]
                scale = np.array([max(base[f"eval/{n}/std"], 1e-12) for n in names])
                diff = np.array([final[f"eval/{n}/mean"] - base[f"eval/{n}/mean"] for n in names])
                gain = diff / scale
                gains.append(gain)
                raw.append(diff)
                base_means.append([base[f"eval/{n}/mean"] for n in names])
                final_means.append([final[f"eval/{n}/mean"] for n in names])
                train_rows = [r for r in all_rows if r["kind"] == "train"]
                shares.append(
                    [np.nanmean([r.get(f"balance/share/{n}", np.nan) for r in train_rows] or [np.nan]) for n in names]
                )
                hvs.append(hv_of(gain[None, :], np.zeros(len(names))))
            g, d = np.stack(gains), np.stack(raw)
            summary[strategy] = {
                "hypervolume": float(np.mean(hvs)),
                "gains": {n: float(g[:, i].mean()) for i, n in enumerate(names)},
                "all_improved_frac": float((g > 0).all(1).mean()),
                "gains_per_seed": {n: [float(x) for x in g[:, i]] for i, n in enumerate(names)},
            }
            per_run = statistics.fmean(seconds[strategy, seed] for seed in range(args.seeds))
            if preset == "mini":
                sh = np.array(shares, dtype=float)
                summary[strategy].update(
                    {
                        "hypervolume_std": float(np.std(hvs)),
                        "base_std": {n: float(scale[i]) for i, n in enumerate(names)},
                        "eval_start": {n: float(np.mean(base_means, axis=0)[i]) for i, n in enumerate(names)},
                        "eval_final": {n: float(np.mean(final_means, axis=0)[i]) for i, n in enumerate(names)},
                        "gain_raw": {n: float(d[:, i].mean()) for i, n in enumerate(names)},
                        "gain_raw_seed_std": {
                            n: float(d[:, i].std(ddof=1)) if len(d) > 1 else None for i, n in enumerate(names)
                        },
                        "share": {n: float(np.nanmean(sh[:, i])) for i, n in enumerate(names)},
                        "seconds_per_run": per_run,
                    }
                )
            cells = " ".join(f"{summary[strategy]['gains'][n]:>20.3f}" for n in names)
            print(f"{strategy:12s} {np.mean(hvs):>12.4g} {cells} {per_run:>7.1f}")
    if "static" in summary and len(summary) > 1 and args.seeds > 1:
        print("\npaired by seed against static (the same prompt draws), mean ± se of the gain difference:")
        for strategy, entry in summary.items():
            if strategy == "static":
                continue
            entry["vs_static"] = paired_difference(entry["gains_per_seed"], summary["static"]["gains_per_seed"])
            cells = " ".join(f"{m:>+11.3f} ± {se:<6.3f}" for m, se in entry["vs_static"].values())
            print(f"{strategy:12s} {'':>12s} {cells}")
    print(json.dumps(summary))


def _train_one(run: dict, threads: int | None = None) -> float:
    """One training run (``run_training`` keyword arguments); returns its wall seconds."""
    from apexcli.train import run_training

    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_training(**run)
    return time.perf_counter() - t0


def _run_all(runs: dict, jobs: int) -> dict:
    """Every run, ``jobs`` at a time in spawned one-thread processes (or here, in order, for 1)."""
    if jobs <= 1:
        return {key: _train_one(run) for key, run in runs.items()}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {key: pool.submit(_train_one, run, 1) for key, run in runs.items()}
        return {key: f.result() for key, f in futures.items()}


def paired_difference(
    gains: dict[str, list[float]], reference: dict[str, list[float]]
) -> dict[str, tuple[float, float]]:
    """Per objective, the mean and standard error of (gain - reference gain) over the shared seeds.

    Runs with one seed draw the same prompts and noise whatever the strategy, so their gains move
    together: the seed-paired difference is the fair comparison, and its se the error bar."""
    out = {}
    for name, values in gains.items():
        d = [a - b for a, b in zip(values, reference[name])]
        out[name] = (statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan"))
    return out


if __name__ == "__main__":
    main()
