"""Held-out evaluation: fixed prompts, fixed noise, the deterministic ODE sampler.

Every evaluation of every run that shares ``eval.seed``, the prompt set and the base model
starts from the same noise, so the step-0 evaluation (LoRA B = 0: the base model) is the
same point for all of them: the reference of ``apex pareto``.

Writes ``eval/step-XXXXXX/grid.png`` and ``scores.jsonl``; returns the ``kind: eval`` metrics row.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import gather_object

from apexcli.backbones import backbone_of_pipeline
from apexcli.config import Config, config_from_dict, validate
from apexcli.errors import ApexError
from apexcli.flow.rollout import decode_latents, latent_channels, rollout
from apexcli.images import image_grid
from apexcli.jsonsafe import finite_or_none
from apexcli.models.loading import load_pipeline, resolve_device
from apexcli.models.lora import load_lora_for_inference, resolve_lora_path
from apexcli.models.text_cache import TextEmbeddingCache, encode_prompts, encoder_fingerprint
from apexcli.prompts import load_prompts
from apexcli.rewards import RewardSuite
from apexcli.runs import LORA_FILE, RunDir, atomic_write_text, parse_step_dirname, reward_summary, step_dirname
from apexcli.seeds import mix_seed


class Evaluator:
    def __init__(
        self,
        cfg: Config,
        pipe,
        cache,
        train_objectives: list[str],
        *,
        device: torch.device,
        accelerator=None,
        prompts: list[str] | None = None,
        seed: int | None = None,
        suite: RewardSuite | None = None,
    ):
        """``prompts``, ``seed`` and ``suite`` replace the eval prompts, ``eval.seed`` and a reward suite
        of its own (apex's progress probe passes training prompts and the trainer's suite)."""
        backbone_of_pipeline(pipe).check_true_cfg(cfg.eval.true_cfg_scale, "eval.true_cfg_scale")
        self.cfg = cfg
        self.device = device
        self.accelerator = accelerator
        self.seed = cfg.eval.seed if seed is None else seed
        self.objectives_requested = (
            list(suite.objectives) if suite is not None else (cfg.eval.objectives or list(train_objectives))
        )
        self.prompts = list(prompts) if prompts is not None else load_prompts(cfg.prompts.eval)[: cfg.eval.num_prompts]
        seq = cfg.model.max_sequence_length
        self.cond = encode_prompts(pipe, self.prompts, max_sequence_length=seq, device="cpu", cache=cache)
        self.uncond = encode_prompts(
            pipe, [cfg.sampling.negative_prompt], max_sequence_length=seq, device=device, cache=cache
        )
        latent = cfg.model.resolution // pipe.vae_scale_factor
        shape = (latent_channels(pipe.transformer), latent, latent)
        # one generator per prompt: the noise of prompt i never depends on batch size or count
        self.noise = torch.stack(
            [
                torch.randn(shape, generator=torch.Generator().manual_seed(mix_seed(self.seed, i)))
                for i in range(len(self.prompts))
            ]
        )
        self._suite = suite
        self._owns_suite = suite is None

    @property
    def suite(self) -> RewardSuite:
        if self._suite is None:
            self._suite = RewardSuite(self.objectives_requested, device=self.device, config=self.cfg.rewards)
        return self._suite

    @torch.no_grad()
    def run(
        self,
        transformer,
        vae,
        scheduler,
        vae_scale_factor: int,
        step: int,
        run: RunDir | None,
        *,
        lockstep: bool = False,
        directory: Path | None = None,
    ) -> dict | None:
        """Every process evaluates its share of the prompts (i = rank, rank + W, ...); the main
        process gathers them, writes the eval folder and returns the row (others return None).

        ``lockstep``: every process runs as many transformer batches, padding with a discarded
        one where its share is smaller; needed when the forward is a collective (FSDP).
        ``directory``: where the grid and scores go instead of ``run``'s ``eval/step-N``."""
        acc = self.accelerator
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        e, res = self.cfg.eval, self.cfg.model.resolution
        was_training = transformer.training
        transformer.eval()
        mine = list(range(rank, len(self.prompts), world))
        most = -(-len(self.prompts) // world)  # the largest share
        n_batches = -(-(most if lockstep else len(mine)) // e.batch_size)
        results: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for b in range(n_batches):
            idx = mine[b * e.batch_size : (b + 1) * e.batch_size]
            padding = not idx
            if padding:
                idx = [rank % len(self.prompts)]
            traj = rollout(
                transformer,
                scheduler,
                self.cond.index(idx).to(self.device),
                num_steps=e.num_steps,
                height=res,
                width=res,
                vae_scale_factor=vae_scale_factor,
                guidance_scale=e.guidance_scale,
                uncond=self.uncond,
                true_cfg_scale=e.true_cfg_scale,
                sampler="ode",
                initial_noise=self.noise[idx],  # rollout copies it to the device without a sync
            )
            if padding:
                continue
            batch = decode_latents(vae, traj.final)
            r, _ = self.suite(batch, [self.prompts[i] for i in idx])
            pixels = (batch.clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # 4x smaller to gather
            results += [(i, pixels[j], r[j]) for j, i in enumerate(idx)]
        transformer.train(was_training)
        if world > 1:
            results = gather_object(results)
            if not acc.is_main_process:
                return None
        results.sort(key=lambda item: item[0])
        images_t = torch.stack([img for _, img, _ in results]).float() / 255
        r_all = torch.stack([r for _, _, r in results])
        row: dict = {"step": step, "kind": "eval"}
        row.update(reward_summary(r_all, self.suite.objectives, "eval"))
        if directory is not None or run is not None:
            self.write(directory or run.eval_dir(step), images_t, r_all)
        return row

    def write(self, directory: Path, images: torch.Tensor, rewards: torch.Tensor) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        image_grid(images).save(directory / "grid.png")
        lines = []
        for i, prompt in enumerate(self.prompts):
            row = {"index": i, "prompt": prompt, "seed": mix_seed(self.seed, i)}
            for k, name in enumerate(self.suite.objectives):
                v = float(rewards[i, k])
                row[name] = finite_or_none(v)
            lines.append(json.dumps(row) + "\n")
        atomic_write_text(directory / "scores.jsonl", "".join(lines))

    def close(self) -> None:
        if self._suite is not None and self._owns_suite:
            self._suite.close()


def evaluate_checkpoint(
    run_path: Path,
    checkpoint: str | None = None,
    *,
    log: bool = False,
    prompts: str | None = None,
    num_prompts: int | None = None,
    seed: int | None = None,
) -> dict:
    """``apex eval RUN``: re-run the run's evaluation on one of its checkpoints (default: the
    newest; ``base`` = the base model). Writes ``eval/step-XXXXXX/`` (``eval/other-RUN-step-XXXXXX/``
    for another run's checkpoint); ``log`` also appends the eval row to metrics.jsonl, refused for
    another run's checkpoint. ``prompts`` / ``num_prompts`` / ``seed`` evaluate on another set
    than the run's: written under ``eval/set-<prompts>-n<N>-seed<S>/``, never into the run's
    metrics (``log`` is refused). Returns the row plus ``eval_dir``."""
    run = RunDir(Path(run_path))
    if not run.config_path.is_file():
        raise ApexError(f"'{run_path}' is not a run directory (no config.yaml); give the --out folder of apex train")
    cfg = config_from_dict(run.read_config())
    validate(cfg)
    own_set = prompts is not None or num_prompts is not None or seed is not None
    if own_set:
        if log:
            raise ApexError(
                "--log appends to the run's own eval rows; an evaluation on other --prompts, "
                "--num-prompts or --seed is written to its own folder only: drop --log"
            )
        cfg = _with_eval_set(cfg, prompts, num_prompts, seed)
    evals = run.path / "eval" / _eval_set_name(cfg) if own_set else run.path / "eval"
    step, directory, weight_file = 0, evals / step_dirname(0), None
    if checkpoint != "base":
        ckpt = resolve_lora_path(checkpoint or run.path, option="--checkpoint")
        if ckpt == run.path and checkpoint is None:
            raise ApexError(
                f"run '{run_path}' has no checkpoint yet; pass --checkpoint base to evaluate the base model"
            )
        step = parse_step_dirname(ckpt.name) or parse_step_dirname(ckpt.parent.name) or 0
        directory = evals / step_dirname(step)
        lora_dir = ckpt / "ema" if cfg.eval.use_ema and (ckpt / "ema").is_dir() else ckpt
        given = _given_file(checkpoint)
        weight_file = given or lora_dir / LORA_FILE  # a file named is the file used
        if (
            ckpt.resolve().parent != run.checkpoints_dir.resolve()
            or weight_file.resolve() != (lora_dir / LORA_FILE).resolve()
        ):
            # another run's checkpoint (or another file than the run's eval uses): its numbers are not
            # this run's, so they never enter its metrics, and its images never replace eval/step-N
            if log:
                raise ApexError(
                    f"--log would append the evaluation of '{given or ckpt}' to the metrics of '{run.path}', but that checkpoint is "
                    f"not one of this run's ({run.checkpoints_dir}); drop --log, or run apex eval on the run that owns it"
                )
            directory = evals / _other_dirname(ckpt, given, step)
    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model)
    if weight_file is not None:
        load_lora_for_inference(pipe, weight_file, option="--checkpoint")
    pipe.to(device)
    cache = TextEmbeddingCache(cfg.model.text_cache_dir, encoder_fingerprint(pipe))
    evaluator = Evaluator(cfg, pipe, cache, cfg.objectives, device=device)
    try:
        row = evaluator.run(
            pipe.transformer, pipe.vae, pipe.scheduler, pipe.vae_scale_factor, step, run, directory=directory
        )
    finally:
        evaluator.close()
    if log:
        run.append_metrics(row)
    return {**row, "eval_dir": str(directory)}


def _with_eval_set(cfg: Config, prompts: str | None, num_prompts: int | None, seed: int | None) -> Config:
    """``cfg`` with another eval prompt set, count or noise seed (validated like the run's own)."""
    from dataclasses import replace

    from apexcli.config import validate
    from apexcli.errors import ApexError

    if num_prompts is not None and num_prompts < 1:
        raise ApexError(f"--num-prompts must be at least 1, got {num_prompts}")
    if seed is not None:  # checked here to name the option, by eval.seed's own rule
        from dataclasses import fields

        from apexcli.config import EvalConfig
        from apexcli.schema import field_rule

        why = field_rule(next(f for f in fields(EvalConfig) if f.name == "seed")).problem(seed)
        if why is not None:
            raise ApexError(f"--seed {why}")
    evaluation = replace(
        cfg.eval,
        num_prompts=cfg.eval.num_prompts if num_prompts is None else num_prompts,
        seed=cfg.eval.seed if seed is None else seed,
    )
    cfg = replace(cfg, eval=evaluation, prompts=replace(cfg.prompts, eval=prompts or cfg.prompts.eval))
    validate(cfg)
    load_prompts(cfg.prompts.eval)  # a missing or empty set fails here, before any model loads
    return cfg


def _eval_set_name(cfg: Config) -> str:
    """``set-<prompt set>-n<N>-seed<S>``: the folder of one eval set, readable and distinct."""
    spec = cfg.prompts.eval
    label = spec[len("builtin:") :] if spec.startswith("builtin:") else Path(spec).stem
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:60] or "prompts"
    return f"set-{label}-n{cfg.eval.num_prompts}-seed{cfg.eval.seed}"


def _given_file(checkpoint: str | None) -> Path | None:
    """The LoRA file ``--checkpoint`` names, if it names a file (not a folder or ``base``)."""
    if checkpoint is None or checkpoint == "base":
        return None
    path = Path(checkpoint).expanduser()
    return path if path.is_file() else None


def _other_dirname(checkpoint: Path, given: Path | None, step: int) -> str:
    """``other-<owner>-step-N``, with the file's stem when a file other than the standard one
    was named: two files of one folder never share (and overwrite) an eval folder."""
    from apexcli.runs import LORA_FILE, step_dirname

    stem = f"-{given.stem}" if given is not None and given.name != LORA_FILE else ""
    return f"other-{_owner_name(checkpoint)}{stem}-{step_dirname(step)}"


def _owner_name(checkpoint: Path) -> str:
    """``runs/b/checkpoints/step-4`` -> ``b``; a loose checkpoint dir -> its own name."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent.parent.name if checkpoint.parent.name == "checkpoints" else checkpoint.name
