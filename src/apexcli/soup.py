"""``apex soup``: rewarded soups of trained runs (Ramé et al., NeurIPS 2023).

Each parent run i fine-tuned the same base weights W0 with a LoRA: W_i = W0 + s B_i A_i
(s = alpha / rank). A rewarded soup with coefficients lambda (lambda_i >= 0, sum 1) is the
weight interpolation of the fine-tuned networks:

    W(lambda) = sum_i lambda_i W_i = W0 + s sum_i lambda_i B_i A_i

written *exactly* as one LoRA of rank sum over the parents with lambda_i != 0 of r:
B = [lambda_1 B_1 | lambda_2 B_2 | ...] (columns), A = [A_1; A_2; ...] (rows), the adapter
metadata's rank and alpha raised so that s is unchanged. (Interpolating A and B separately
would mix products B_i A_j and is only close to this when the runs share their LoRA
initialisation.) Parents with lambda_i = 0 are left out, so a 0/1 coefficient writes the
parent's tensors and metadata unchanged.

Every mixture becomes a run directory that ``apex pareto`` reads like any other:

    <out>/<soup-...>/config.yaml       the first parent's config with the mixture's own lora.rank and
                                       lora.alpha (those of its file); eval.objectives = union of the parents'
    <out>/<soup-...>/soup.json         parents (paths, names, checkpoints) and coefficients
    <out>/<soup-...>/metrics.jsonl     the step-0 (base) eval row and the mixture's eval row
    <out>/<soup-...>/eval/step-*/      grid.png, scores.jsonl (the base's copied from a parent)
    <out>/<soup-...>/checkpoints/step-S/pytorch_lora_weights.safetensors   (S = the parents' last step)

The mixtures are evaluated with the parents' eval config (same prompts, noise, steps, CFG),
through the same ``Evaluator`` as training, on one pipeline loaded once.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from apexcli.config_upgrade import upgrade_config
from apexcli.errors import ApexError
from apexcli.runs import LORA_FILE, SOUP_FILE, RunDir, atomic_directory, atomic_write_text, parse_step_dirname

META_KEY = "lora_adapter_metadata"
META_PREFIX = "transformer."
# config keys (dotted) that must agree for the parents' LoRAs to be mixed and evaluated together
SAME_MODEL = ("model.pretrained", "model.revision", "model.variant", "model.tiny_seed")
SAME_LORA = ("lora.rank", "lora.alpha", "lora.target_modules")
SAME_EVAL = (
    "model.resolution",
    "model.max_sequence_length",
    "prompts.eval",
    "eval.num_prompts",
    "eval.num_steps",
    "eval.guidance_scale",
    "eval.true_cfg_scale",
    "eval.seed",
    "sampling.negative_prompt",
)


@dataclass
class Parent:
    run: RunDir
    name: str
    config: dict
    checkpoint: Path  # the checkpoint dir
    lora_dir: Path  # the folder of the LoRA file the run's eval uses (ema/ when eval.use_ema)
    step: int


@dataclass
class LoraFile:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_lora(directory: Path) -> LoraFile:
    """A parent's LoRA file, refused (naming file and tensor) when a tensor is broken: a NaN
    parent would otherwise make every mixture of it black."""
    from apexcli.models.lora import check_lora_tensors

    path = Path(directory) / LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        lora = LoraFile({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}))
    check_lora_tensors(lora.tensors, path, option="the parent's LoRA")
    return lora


def mix_loras(loras: Sequence[LoraFile], coefficients: Sequence[float]) -> LoraFile:
    """The exact LoRA of sum_i c_i B_i A_i (module docstring); parents with c_i = 0 left out."""
    if len(loras) != len(coefficients):
        raise ApexError(f"{len(coefficients)} coefficients for {len(loras)} LoRAs; give one per run")
    used = [(lo, float(c)) for lo, c in zip(loras, coefficients) if c != 0]
    if not used:
        raise ApexError("every coefficient is 0: give at least one positive coefficient")
    keys = set(loras[0].tensors)
    for lo in loras[1:]:
        if set(lo.tensors) != keys:
            diff = sorted(keys.symmetric_difference(lo.tensors))[0]
            raise ApexError(
                f"the runs' LoRAs adapt different modules (e.g. {diff}); soups need the same lora.target_modules"
            )
    if len(used) == 1 and used[0][1] == 1.0:
        return LoraFile(dict(used[0][0].tensors), dict(used[0][0].metadata))
    tensors: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if key.endswith("lora_A.weight"):
            tensors[key] = torch.cat([lo.tensors[key] for lo, _ in used], dim=0)
        elif key.endswith("lora_B.weight"):
            tensors[key] = torch.cat([lo.tensors[key] * c for lo, c in used], dim=1)
        else:
            raise ApexError(f"LoRA tensor '{key}' is neither lora_A nor lora_B; apex soup mixes plain LoRA only")
    return LoraFile(tensors, _scaled_metadata(loras[0].metadata, len(used)))


def _scaled_metadata(metadata: dict[str, str], n: int) -> dict[str, str]:
    """Rank x n with the same scale alpha / rank (alpha / sqrt(rank) under rsLoRA)."""
    if META_KEY not in metadata:
        raise ApexError("the LoRA file has no adapter metadata (rank, alpha); re-save it with apex train")
    meta = json.loads(metadata[META_KEY])
    if meta.get(f"{META_PREFIX}rank_pattern") or meta.get(f"{META_PREFIX}alpha_pattern"):
        raise ApexError("the LoRA has per-module rank or alpha patterns; apex soup mixes uniform LoRAs only")
    r, alpha = meta[f"{META_PREFIX}r"], meta[f"{META_PREFIX}lora_alpha"]
    meta[f"{META_PREFIX}r"] = r * n
    factor = math.sqrt(n) if meta.get(f"{META_PREFIX}use_rslora") else n
    new_alpha = alpha * factor
    meta[f"{META_PREFIX}lora_alpha"] = int(new_alpha) if float(new_alpha).is_integer() else new_alpha
    return {**metadata, META_KEY: json.dumps(meta, indent=2)}


def rank_and_alpha(lora: LoraFile) -> tuple[int, int | float]:
    """The rank and alpha a LoRA file's adapter metadata gives (a mixture's: raised by its parents)."""
    meta = json.loads(lora.metadata[META_KEY])
    return meta[f"{META_PREFIX}r"], meta[f"{META_PREFIX}lora_alpha"]


def delta_weights(lora: LoraFile) -> dict[str, torch.Tensor]:
    """module -> s B A (the weight change the LoRA applies), for checks and tests."""
    meta = json.loads(lora.metadata[META_KEY])
    r, alpha = meta[f"{META_PREFIX}r"], meta[f"{META_PREFIX}lora_alpha"]
    scale = alpha / math.sqrt(r) if meta.get(f"{META_PREFIX}use_rslora") else alpha / r
    out = {}
    for key, a in lora.tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            b = lora.tensors[f"{module}.lora_B.weight"]
            out[module] = scale * (b.double() @ a.double())
    return out


def parse_coefficients(texts: Sequence[str], n_runs: int) -> list[list[float]]:
    """``["0.25,0.75", ...]`` -> coefficient vectors; default for two runs: 0.25, 0.5, 0.75.
    One run is refused before any coefficient: its only mixture is the run itself."""
    if n_runs < 2:
        raise ApexError(
            f"apex soup needs two or more runs, got {n_runs}: a soup of one run is that run itself; "
            "give the runs to mix"
        )
    if not texts:
        if n_runs != 2:
            raise ApexError(
                f"give --coef for a soup of {n_runs} runs (e.g. --coef {','.join(['%.3g' % (1 / n_runs)] * n_runs)})"
            )
        return [[1 - t, t] for t in (0.25, 0.5, 0.75)]
    out = []
    for text in texts:
        try:
            values = [float(x) + 0.0 for x in str(text).split(",") if x.strip()]  # + 0.0: -0 is 0
        except ValueError:
            raise ApexError(f"--coef '{text}' is not a comma-separated list of numbers") from None
        if len(values) != n_runs:
            raise ApexError(f"--coef '{text}' has {len(values)} values for {n_runs} runs; give one per run")
        if not all(math.isfinite(v) and v >= 0 for v in values) or abs(sum(values) - 1) > 1e-6:
            raise ApexError(f"--coef '{text}' must be >= 0 and sum to 1 (a convex mixture of the runs)")
        out.append(values)
    return out


def load_parents(paths: Sequence[Path]) -> list[Parent]:
    """Read each parent run and check that their LoRAs and evals are compatible."""
    if len(paths) < 2:
        raise ApexError("apex soup needs two or more runs")
    parents = []
    for p in paths:
        run = RunDir(Path(p))
        if not run.config_path.is_file():
            raise ApexError(f"'{p}' is not a run directory (no config.yaml); give folders made by apex train")
        config, _ = upgrade_config(run.read_config())  # a run written before keys moved reads as today's
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise ApexError(f"run '{p}' has no checkpoint with a LoRA yet; train it longer or with checkpoints on")
        use_ema = bool(_get(config, "eval.use_ema"))
        lora_dir = ckpt / "ema" if use_ema and (ckpt / "ema" / LORA_FILE).is_file() else ckpt
        name = str(config.get("name") or run.path.name)
        parents.append(Parent(run, name, config, ckpt, lora_dir, parse_step_dirname(ckpt.name) or 0))
    first = parents[0]
    for other in parents[1:]:
        for keys, what in ((SAME_MODEL, "base model"), (SAME_LORA, "LoRA"), (SAME_EVAL, "eval setup")):
            for key in keys:
                a, b = _setting(first.config, key), _setting(other.config, key)
                if a != b:
                    raise ApexError(
                        f"runs '{first.run.path}' and '{other.run.path}' have different {what} ({key}: {a!r} vs {b!r}); "
                        "soups mix runs of one base model, LoRA shape and eval setup"
                    )
    return parents


def make_soups(
    runs: Sequence[Path],
    coefficients: Sequence[Sequence[float]],
    out: Path,
    *,
    evaluate: bool = True,
) -> list[Path]:
    """Write one run directory per coefficient vector under ``out`` and evaluate it; returns them."""
    parents = load_parents(runs)
    loras = [read_lora(p.lora_dir) for p in parents]
    shapes = {k: tuple(v.shape) for k, v in loras[0].tensors.items()}
    for p, lo in zip(parents[1:], loras[1:]):
        for k, v in lo.tensors.items():
            if k in shapes and tuple(v.shape) != shapes[k]:
                raise ApexError(
                    f"LoRA tensor {k} is {tuple(v.shape)} in '{p.run.path}' but {shapes[k]} in '{parents[0].run.path}'; soups need one LoRA shape"
                )
    step = max(p.step for p in parents)
    if step == 0:
        raise ApexError("the parents' checkpoints are all at step 0 (the base model); train them first")
    eval_objectives = _union(_eval_objectives(p.config) for p in parents)
    out = Path(out).expanduser()
    folders = [out / soup_folder_name(coefs) for coefs in coefficients]
    for folder in folders:  # checked before anything is written
        if folder.exists():
            raise ApexError(f"'{folder}' exists; remove it or choose another --out")
    for i, folder in enumerate(folders):  # names are exact: only the same mixture twice collides
        if folder in folders[:i]:
            raise ApexError(
                f"the mixture {','.join(map(_label, coefficients[i]))} is given twice (--coef); give each mixture once"
            )
    made = []
    for coefs, folder in zip(coefficients, folders):
        mixed = mix_loras(loras, coefs)
        run = RunDir(folder)
        run.create()
        config = json.loads(json.dumps(parents[0].config))  # a deep copy of plain data
        config["name"] = "soup(" + " + ".join(f"{c:g}*{p.name}" for c, p in zip(coefs, parents) if c != 0) + ")"
        config["out"] = str(folder)
        config.setdefault("eval", {})["objectives"] = eval_objectives
        rank, alpha = rank_and_alpha(mixed)  # the file's, not the parents' (factors are concatenated)
        config.setdefault("lora", {}).update(rank=rank, alpha=alpha)
        run.write_config(config)
        atomic_write_text(
            folder / SOUP_FILE,
            json.dumps(
                {
                    "method": "rewarded soup: W = W0 + sum_i c_i s B_i A_i, one LoRA of concatenated factors",
                    "parents": [str(p.run.path.resolve()) for p in parents],
                    "names": [p.name for p in parents],
                    "checkpoints": [str(p.lora_dir.resolve()) for p in parents],
                    "coefficients": [float(c) for c in coefs],
                    "step": step,
                },
                indent=2,
            )
            + "\n",
        )
        with atomic_directory(run.checkpoint_dir(step)) as tmp:
            save_file(mixed.tensors, str(tmp / LORA_FILE), metadata=mixed.metadata)
        run.metrics_path.touch()
        made.append(folder)
    if evaluate:
        _evaluate(parents, made, step, eval_objectives)
    return made


NAME_LIMIT = 200  # bytes of a folder name, under the file systems' 255


def _label(c: float) -> str:
    """A coefficient as short as it prints (0.25), or its exact repr when that would lose digits:
    0.3333333 and 0.33333334 once named one folder and were reported as "the same --coef twice"."""
    short = f"{c:g}"
    return short if float(short) == c else repr(c)


def soup_folder_name(coefs: Sequence[float]) -> str:
    """``soup-0.25-0.75``: distinct for distinct mixtures; a digest for names too long to hold."""
    name = "soup-" + "-".join(_label(c) for c in coefs)
    if len(name.encode()) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"soup-{len(coefs)}-runs-{digest}"  # soup.json holds the coefficients


def _evaluate(parents: list[Parent], folders: list[Path], step: int, objectives: list[str]) -> None:
    """Evaluate every mixture (and give each the base model's step-0 eval) on one pipeline."""
    from apexcli.config import config_from_dict, validate
    from apexcli.eval.evaluator import Evaluator
    from apexcli.models.loading import load_pipeline, resolve_device
    from apexcli.models.text_cache import TextEmbeddingCache, encoder_fingerprint

    cfg = config_from_dict(RunDir(folders[0]).read_config())
    validate(cfg)
    base_row, base_dir = _base_eval(parents, objectives)
    device = resolve_device(cfg.model.device)
    pipe = load_pipeline(cfg.model)
    pipe.to(device)
    cache = TextEmbeddingCache(cfg.model.text_cache_dir, encoder_fingerprint(pipe))
    evaluator = Evaluator(cfg, pipe, cache, cfg.objectives, device=device)
    try:
        if base_row is None:  # no parent evaluated the base model on every objective: do it once
            scratch = RunDir(folders[0])
            base_row = evaluator.run(pipe.transformer, pipe.vae, pipe.scheduler, pipe.vae_scale_factor, 0, scratch)
            base_dir = scratch.eval_dir(0)
        for folder in folders:
            run = RunDir(folder)
            if run.eval_dir(0) != base_dir:
                shutil.copytree(base_dir, run.eval_dir(0), dirs_exist_ok=True)
            run.append_metrics(base_row)
            pipe.load_lora_weights(str(run.checkpoint_dir(step)), weight_name=LORA_FILE, adapter_name="soup")
            try:
                row = evaluator.run(pipe.transformer, pipe.vae, pipe.scheduler, pipe.vae_scale_factor, step, run)
            finally:
                pipe.delete_adapters("soup")
            run.append_metrics(row)
    finally:
        evaluator.close()


def _base_eval(parents: list[Parent], objectives: list[str]) -> tuple[dict | None, Path | None]:
    """A parent's step-0 eval row and folder when it covers every objective, else (None, None)."""
    for p in parents:
        rows = [r for r in p.run.read_metrics().rows if r.get("kind") == "eval" and r["step"] == 0]
        folder = p.run.eval_dir(0)
        if rows and (folder / "scores.jsonl").is_file() and all(f"eval/{k}/mean" in rows[-1] for k in objectives):
            return rows[-1], folder
    return None, None


def _eval_objectives(config: dict) -> list[str]:
    return list(_get(config, "eval.objectives") or config.get("objectives") or [])


def _union(lists) -> list[str]:
    out: list[str] = []
    for items in lists:
        out += [k for k in items if k not in out]
    return out


def _setting(config: dict, dotted: str):
    """``dotted``'s value in a run's config, or its default where the config predates the key."""
    from apexcli.config import Config, config_to_dict

    value = _get(config, dotted)
    return _get(config_to_dict(Config()), dotted) if value is None else value


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node
