"""The typed configuration: one dataclass per section, one documented field each.

A config is resolved in layers, later layers winning:

    preset YAML (``--preset``)  ->  ``--config FILE``  ->  command-line options  ->  ``key=value`` overrides

Every error names the dotted key (``train.lr``) and what it expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from apexcli.balance.config import BalanceConfig
from apexcli.errors import ApexError
from apexcli.rewards.config import RewardsConfig
from apexcli.schema import deep_merge, from_dict, parse_override

SD3_JOINT_ATTENTION_PROJECTIONS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


@dataclass
class ModelConfig:
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
    """Hub id or local directory of a diffusers SD3 pipeline; ``tiny`` builds a random tiny one in code;
    ``mini`` loads the small pipeline pretrained on the procedural world, shipped in the package."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    variant: str | None = None
    """Weight-file variant, e.g. ``fp16``."""
    local_files_only: bool = False
    """Never contact the hub; load from the local cache or directory only."""
    dtype: str = "bfloat16"
    """Dtype of the frozen base weights: float32, bfloat16 or float16. LoRA weights train in float32."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ... (ignored under accelerate launch)."""
    resolution: int = 512
    """Square image size in pixels for training rollouts and evaluation."""
    max_sequence_length: int = 256
    """T5 tokens kept per prompt."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile each transformer block (regional; every forward uses it, FSDP/DDP hooks stay
    eager). Pays a warm-up on the first steps; on a CPU it needs a C compiler."""
    attention: str = "auto"
    """Scaled-dot-product attention kernel: auto (PyTorch picks), flash, efficient, cudnn or math."""
    text_cache_dir: str | None = None
    """Directory for cached prompt embeddings (safetensors); None keeps them in memory only."""
    free_text_encoders: bool = True
    """Drop the text encoders once every prompt is embedded (T5-XXL alone is ~9.5 GB in bf16)."""
    tiny_seed: int = 0
    """Seed of the random weights when ``pretrained: tiny``."""


@dataclass
class LoraSettings:
    rank: int = 32
    """LoRA rank r."""
    alpha: int = 64
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """LoRA dropout. Keep 0: dropout breaks the ratio == 1 invariant of on-policy PPO."""
    target_modules: list[str] = field(default_factory=lambda: list(SD3_JOINT_ATTENTION_PROJECTIONS))
    """Module name suffixes that get adapters (default: the joint-attention projections)."""


@dataclass
class SamplingConfig:
    num_steps: int = 10
    """Denoising steps of a training rollout."""
    guidance_scale: float = 4.5
    """Classifier-free guidance in rollouts and training; <= 1 disables CFG (half the forwards)."""
    sampler: str = "sde"
    """Stochastic sampler of the trained steps: sde (Flow-GRPO) or cps (coefficient-preserving)."""
    noise_level: float = 0.7
    """The SDE noise level a (sigma_t = a * sqrt(s / (1 - s)))."""
    share_group_noise: bool = False
    """Start every sample of a prompt group from the same initial noise."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of CFG."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Training iterations (one rollout batch + policy update each)."""
    prompts_per_step: int = 16
    """Prompt groups per iteration, over all processes."""
    group_size: int = 24
    """Samples per prompt (the GRPO group)."""
    rollout_batch_size: int = 8
    """Samples per rollout forward, per process."""
    train_batch_size: int = 8
    """Samples per training micro-batch, per process."""
    gradient_accumulation: int = 0
    """Micro-batches per optimizer step; 0 = all of a process's samples (one update per epoch)."""
    inner_epochs: int = 1
    """Passes of policy updates over each rollout batch."""
    window_start: int = 0
    """First denoising step that is stochastic and trained."""
    window_size: int = 0
    """Number of trained (SDE) steps from window_start; 0 = all but the last step. Steps outside
    the window are sampled with the ODE and not trained (Flow-GRPO-Fast / MixGRPO style)."""
    timestep_fraction: float = 1.0
    """Fraction of the window's steps trained per sample (a random subset each epoch)."""
    lr: float = 3e-4
    """AdamW learning rate."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up, in optimizer steps."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip; <= 0 disables."""
    clip_range: float = 1e-4
    """PPO ratio clip epsilon (tiny: the log-prob is a mean over latent dims)."""
    adv_clip: float = 5.0
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    kl_beta: float = 0.04
    """Weight of the KL to the base model (LoRA disabled); 0 skips the reference forward."""
    ema_decay: float = 0.0
    """EMA of the LoRA weights used for evaluation and saved beside them; 0 = off."""
    checkpoint_every: int = 50
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the N most recent checkpoints; 0 = keep all."""


@dataclass
class PromptsConfig:
    train: str = "builtin:mixed"
    """Training prompts: a .txt (one per line) or .jsonl ({"prompt": ...}) file, or builtin:NAME."""
    eval: str = "builtin:mixed_eval"
    """Held-out evaluation prompts (same formats)."""


@dataclass
class EvalConfig:
    every: int = 50
    """Evaluate at step 0, every N steps and at the end; 0 disables evaluation."""
    num_steps: int = 40
    """ODE steps of evaluation sampling."""
    guidance_scale: float = 4.5
    """CFG of evaluation sampling."""
    num_prompts: int = 16
    """Held-out prompts used (the first N of the eval set)."""
    seed: int = 1234
    """Seed of the fixed evaluation noise (identical at every evaluation)."""
    batch_size: int = 8
    """Samples per evaluation forward."""
    objectives: list[str] | None = None
    """Objectives scored at evaluation; None = the trained objectives (may add untrained ones)."""
    use_ema: bool = True
    """Evaluate the EMA weights when train.ema_decay > 0."""


@dataclass
class LoggingConfig:
    tracker: str = "none"
    """Experiment tracker through accelerate: none, tensorboard or wandb."""
    progress: bool = True
    """Show the rich progress display."""


@dataclass
class Config:
    objectives: list[str] = field(default_factory=lambda: ["pick", "deqa", "aes", "ocr"])
    """Reward names to optimise (see ``apex score --help`` for the list)."""
    name: str | None = None
    """Run name (default: the output folder's name)."""
    preset: str | None = None
    """The preset this config started from (informational)."""
    out: str = "runs/apex"
    """Run directory: config, metrics, checkpoints, evaluations."""
    seed: int = 42
    """Seed of prompts, noise and LoRA initialisation; a run is reproducible from it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def config_from_dict(data: dict) -> Config:
    return from_dict(Config, data)


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def field_docs(cls) -> dict[str, str]:
    """Field docstrings (the string literal under each field), for documentation tables."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


# ---------------------------------------------------------------------------------------------
# layering: presets, files, overrides
# ---------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("apexcli.presets").iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str) -> dict:
    path = resources.files("apexcli.presets") / f"{name}.yaml"
    if not path.is_file():
        raise ApexError(f"unknown preset '{name}'; valid: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    data["preset"] = name
    return data


def load_yaml_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ApexError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ApexError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ApexError(f"config file '{path}' must hold a mapping at the top level")
    return data


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    options: dict | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Build and validate the config from its layers (see module docstring)."""
    data: dict = {}
    if preset:
        data = deep_merge(data, load_preset(preset))
    if config_file:
        data = deep_merge(data, load_yaml_file(config_file))
    if options:
        data = deep_merge(data, options)
    for text in overrides or []:
        data = deep_merge(data, parse_override(text))
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ApexError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express. Objective names are checked against the
    reward registry when the reward suite is built."""
    t, s, m = cfg.train, cfg.sampling, cfg.model
    _check(len(cfg.objectives) > 0, "objectives", "needs at least one objective")
    _check(len(set(cfg.objectives)) == len(cfg.objectives), "objectives", f"has duplicates: {cfg.objectives}")
    _check(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"must be float32, bfloat16 or float16, got '{m.dtype}'")
    _check(m.attention in ("auto", "flash", "efficient", "cudnn", "math"), "model.attention", f"must be auto, flash, efficient, cudnn or math, got '{m.attention}'")
    _check(m.resolution > 0 and m.resolution % 16 == 0, "model.resolution", f"must be a positive multiple of 16, got {m.resolution}")
    _check(s.sampler in ("sde", "cps"), "sampling.sampler", f"must be sde or cps, got '{s.sampler}'")
    _check(s.num_steps >= 2, "sampling.num_steps", f"must be >= 2, got {s.num_steps}")
    _check(0 < s.noise_level <= 1.5, "sampling.noise_level", f"must be in (0, 1.5], got {s.noise_level}")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.group_size >= 2, "train.group_size", f"must be >= 2 (GRPO compares samples of one prompt), got {t.group_size}")
    _check(t.prompts_per_step >= 1, "train.prompts_per_step", f"must be >= 1, got {t.prompts_per_step}")
    for key in ("rollout_batch_size", "train_batch_size", "inner_epochs"):
        _check(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    total = t.group_size * t.prompts_per_step
    _check(
        total % t.rollout_batch_size == 0,
        "train.rollout_batch_size",
        f"({t.rollout_batch_size}) must divide group_size x prompts_per_step ({total})",
    )
    _check(total % t.train_batch_size == 0, "train.train_batch_size", f"({t.train_batch_size}) must divide group_size x prompts_per_step ({total})")
    _check(0 <= t.window_start < s.num_steps, "train.window_start", f"must be in [0, sampling.num_steps), got {t.window_start}")
    _check(
        t.window_size >= 0 and t.window_start + t.window_size <= s.num_steps,
        "train.window_size",
        f"window [{t.window_start}, {t.window_start + t.window_size}) exceeds sampling.num_steps={s.num_steps}",
    )
    _check(0 < t.timestep_fraction <= 1, "train.timestep_fraction", f"must be in (0, 1], got {t.timestep_fraction}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(t.clip_range > 0, "train.clip_range", f"must be > 0, got {t.clip_range}")
    _check(t.kl_beta >= 0, "train.kl_beta", f"must be >= 0, got {t.kl_beta}")
    _check(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1), got {t.ema_decay}")
    _check(cfg.lora.rank >= 1, "lora.rank", f"must be >= 1, got {cfg.lora.rank}")
    _check(cfg.logging.tracker in ("none", "tensorboard", "wandb"), "logging.tracker", f"must be none, tensorboard or wandb, got '{cfg.logging.tracker}'")
    _check(cfg.eval.every >= 0, "eval.every", f"must be >= 0, got {cfg.eval.every}")
    cfg.balance.validate(len(cfg.objectives))


def trained_steps(cfg: Config) -> list[int]:
    """Indices of the denoising steps that are stochastic and trained."""
    t, n = cfg.train, cfg.sampling.num_steps
    size = t.window_size or (n - 1 - t.window_start)
    return list(range(t.window_start, t.window_start + max(size, 1)))
