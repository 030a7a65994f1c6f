"""The typed configuration: one dataclass per section, one documented field each.

A config is resolved in layers, later layers winning:

    preset YAML (``--preset``)  ->  ``--config FILE``  ->  command-line options  ->  ``key=value`` overrides

Every error names the dotted key (``train.lr``) and what it expected.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.balance.config import BalanceConfig
from apexcli.config_upgrade import reject_old_keys, upgrade_config
from apexcli.errors import ApexError
from apexcli.rewards.config import RewardsConfig
from apexcli.schema import check_fields, deep_merge, from_dict, parse_override, setting

LR_SCHEDULES = ("constant", "cosine", "linear")
"""The values of ``train.lr_schedule``; ``apexcli.train.lr_schedule`` computes their factors."""

POLICY_LOSS_NAMES = ("grpo", "nft")
"""The values of ``train.loss``; ``apexcli.train.losses`` implements them."""


@dataclass
class ModelConfig:
    pretrained: str = setting("stabilityai/stable-diffusion-3.5-medium", nonempty=True, resume="refuse")
    """Hub id or local directory of a diffusers SD3 pipeline; ``tiny`` builds a random tiny one in code;
    ``mini`` loads the small pipeline pretrained on the procedural world, shipped in the package."""
    revision: str | None = setting(None, resume="refuse")
    """Hub revision (branch, tag or commit) to load."""
    variant: str | None = setting(None, resume="refuse")
    """Weight-file variant, e.g. ``fp16``."""
    local_files_only: bool = False
    """Never contact the hub; load from the local cache or directory only."""
    dtype: str = setting("bfloat16", choices=("float32", "bfloat16", "float16"))
    """Dtype of the frozen base weights: float32, bfloat16 or float16. LoRA weights train in float32."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ... (ignored under accelerate launch)."""
    resolution: int = setting(512, ge=16, le=4096)
    """Square image size in pixels for training rollouts and evaluation."""
    max_sequence_length: int = setting(128, ge=1, le=512)
    """T5 tokens kept per prompt (Flow-GRPO: 128; T5's own limit is 512)."""
    gradient_checkpointing: bool = False
    """Recompute transformer activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """torch.compile each transformer block (regional; every forward uses it, FSDP/DDP hooks stay
    eager). Pays a warm-up on the first steps; on a CPU it needs a C compiler."""
    attention: str = setting("auto", choices=("auto", "flash", "efficient", "cudnn", "math"))
    """Scaled-dot-product attention kernel: auto (PyTorch picks), flash, efficient, cudnn or math."""
    text_cache_dir: str | None = None
    """Directory for cached prompt embeddings (safetensors); None keeps them in memory only."""
    free_text_encoders: bool = True
    """Drop the text encoders once every prompt is embedded (T5-XXL alone is ~9.5 GB in bf16)."""
    tiny_seed: int = setting(0, ge=0, le=2**32 - 1, resume="refuse")
    """Seed of the random weights when ``pretrained: tiny``."""


@dataclass
class LoraSettings:
    rank: int = setting(32, ge=1, le=1024, resume="refuse")
    """LoRA rank r."""
    alpha: int = setting(64, gt=0, resume="refuse")
    """LoRA alpha; the update is scaled by alpha / rank."""
    dropout: float = setting(0.0, ge=0, lt=1)
    """LoRA dropout. Keep 0: dropout breaks the ratio == 1 invariant of on-policy PPO."""
    target_modules: list[str] = setting(
        default_factory=lambda: list(JOINT_ATTENTION_PROJECTIONS), nonempty=True, resume="refuse"
    )
    """Module name suffixes that get adapters (default: the joint-attention projections)."""
    init: str = setting("gaussian", choices=("kaiming", "gaussian"), resume="refuse")
    """Initialisation of the A matrices (B starts at 0 either way): kaiming (peft's default,
    Kaiming-uniform, std 1/sqrt(3 fan_in)) or gaussian (peft's ``gaussian``: std 1/r, Flow-GRPO's choice)."""


@dataclass
class SamplingExperimental:
    """Research settings of the sampler, ours, measured only on the small ``mini`` preset
    (docs/method/extensions.md); a run that changes one says so when it starts."""

    noise_block: int = setting(1, ge=1)
    """sde only: the trained steps' noise is constant on latent blocks of this side (1 = per
    element, Flow-GRPO); must divide the latent size. The marginals stay exact, and the noise
    dimensions a reward ignores leave the gradient (docs/method/extensions.md, "Exploration on latent
    blocks"). Measured on mini: a brightness update's signal 0.0117 -> 0.0457 at 4; ocr and adherence
    unresolved either way (docs/experiments/2026-11-30-gradient-signal-noise-blocks.md)."""


@dataclass
class SamplingConfig:
    num_steps: int = setting(10, ge=2, le=1000)
    """Denoising steps of a training rollout."""
    guidance_scale: float = setting(4.5, ge=0)
    """Classifier-free guidance in rollouts and training; <= 1 disables CFG (half the forwards).
    FLUX.1-dev: the distilled guidance, an input of one forward (schnell ignores it)."""
    true_cfg_scale: float = setting(1.0, ge=1)
    """FLUX only: true classifier-free guidance on top of the distilled guidance, ``v = v_neg + s
    (v_cond - v_neg)`` with a forward on ``sampling.negative_prompt`` (diffusers' ``true_cfg_scale``);
    1 = off. Doubles the forwards. SD3 refuses it: its ``guidance_scale`` is already true CFG."""
    sampler: str = setting("sde", choices=("sde", "cps", "cps_gaussian"))
    """Stochastic sampler of the trained steps: sde (Flow-GRPO), cps (coefficient-preserving, log-prob
    -(x'-mean)^2 as Flow-GRPO; use train.clip_range=1e-5 as it does) or cps_gaussian (CPS scored
    with the full Gaussian density: the last trained step then dominates the gradient)."""
    noise_level: float = setting(0.7, gt=0, le=1.5)
    """The SDE noise level a (sigma_t = a * sqrt(s / (1 - s)))."""
    share_group_noise: bool = False
    """Start every sample of a prompt group from the same initial noise (Flow-GRPO's ``same_latent``)."""
    negative_prompt: str = ""
    """Prompt of the unconditional branch of CFG (and of FLUX's true CFG)."""
    experimental: SamplingExperimental = field(default_factory=SamplingExperimental)
    """Research settings of the sampler (sampling.experimental.*)."""


@dataclass
class TrainExperimental:
    """Research settings of training, ours, measured only on the small ``mini`` preset
    (docs/method/extensions.md); a run that changes one says so when it starts."""

    anchor_beta: float = setting(0.0, ge=0)
    """grpo: weight of a penalty ``mean (v_theta - v_base)^2`` on the velocity at one random step
    outside the trained window per sample (0 = off), relative to the policy loss's mean over trained
    steps: a LoRA moves every timestep but the GRPO and KL terms see only the window. Measured on
    mini at lr 1e-2: no ocr run collapsed with it, all did without; it cost brightness some gain
    (docs/experiments/2026-11-30-anchor.md)."""
    nft_beta: float = setting(1.0, gt=0)
    """train.loss=nft: trust-region strength; the loss's minimiser is ``d = -w (v_old - target) /
    nft_beta``. Not measured apart from the loss (docs/experiments/2026-11-30-nft-loss.md)."""
    nft_adv_scale: float = setting(5.0, gt=0)
    """train.loss=nft: a sample's weight is ``clamp(A / nft_adv_scale, -1, 1)``. At train.adv_clip (5)
    nothing is clamped, so a group's weights still sum to 0 and what its samples share cancels;
    DiffusionNFT clamps at 1 std. Not measured apart from the loss
    (docs/experiments/2026-11-30-nft-loss.md)."""
    nft_timesteps: int = setting(1, ge=1)
    """train.loss=nft: grid steps trained per sample and epoch (distinct, random; shared within a
    group, with one noise per group and step, so a group's samples differ only in their x0). Measured
    on mini at 4 (its preset): adherence +0.152 ± 0.016 raw in 30 updates, the only loss that moved it
    beyond seed noise (docs/experiments/2026-12-01-mini-without-guidance.md)."""


@dataclass
class TrainConfig:
    steps: int = setting(1000, ge=1)
    """Training iterations (one rollout batch + policy update each)."""
    prompts_per_step: int = setting(48, ge=1, le=4096)
    """Prompt groups per iteration, over all processes."""
    group_size: int = setting(24, ge=2, le=1024)
    """Samples per prompt (the GRPO group)."""
    rollout_batch_size: int = setting(12, ge=1)
    """Samples per rollout forward, per process."""
    train_batch_size: int = setting(12, ge=1)
    """Samples per training micro-batch, per process."""
    inner_epochs: int = setting(1, ge=1)
    """Passes of policy updates over each rollout batch."""
    window_start: int = setting(0, ge=0)
    """First denoising step that is stochastic and trained."""
    window_size: int = setting(0, ge=0)
    """Number of trained (SDE) steps from window_start; 0 = all but the last step. Steps outside
    the window are sampled with the ODE and not trained (Flow-GRPO-Fast / MixGRPO style)."""
    timestep_fraction: float = setting(0.99, gt=0, le=1)
    """Fraction of the window's steps trained per sample (a random subset each epoch)."""
    lr: float = setting(3e-4, gt=0)
    """AdamW learning rate."""
    weight_decay: float = setting(1e-4, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = setting(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = setting(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_eps: float = setting(1e-8, gt=0)
    """AdamW epsilon."""
    warmup_steps: int = setting(0, ge=0)
    """Linear learning-rate warm-up, in optimizer steps."""
    lr_schedule: str = setting("constant", choices=LR_SCHEDULES)
    """Decay of the learning rate over the run's training updates: constant, or cosine / linear
    from train.lr at the first update to train.lr x train.lr_final at the last (by update, not
    optimizer step: an update with no optimizer step does not shift it)."""
    lr_final: float = setting(0.1, ge=0, le=1)
    """With a cosine or linear train.lr_schedule, the last update's lr as a fraction of train.lr."""
    max_grad_norm: float = setting(1.0)
    """Gradient-norm clip; <= 0 disables."""
    clip_range: float = setting(1e-4, gt=0)
    """PPO ratio clip epsilon (tiny: the log-prob is a mean over latent dims)."""
    adv_clip: float = setting(5.0, gt=0)
    """Advantages are clipped to [-adv_clip, adv_clip]."""
    kl_beta: float = setting(0.04, ge=0)
    """Weight of the KL to the base model (LoRA disabled); 0 skips the reference forward."""
    ema_decay: float = setting(0.9, ge=0, lt=1)
    """EMA of the LoRA weights used for evaluation and saved beside them; 0 = off."""
    checkpoint_every: int = setting(50, ge=0)
    """Save a checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = setting(3, ge=0)
    """Keep the N most recent checkpoints; 0 = keep all."""
    kl_form: str = setting("reference", choices=("exact", "reference"))
    """KL penalty per step: exact (divides by the step variance sig_t^2 |dt|) or reference
    (divides by sig_t^2, as Flow-GRPO: 1/|dt| weaker, 13x on average over SD3.5-M's 10 steps).
    A kl_beta taken from Flow-GRPO needs reference."""
    optimizer_steps_per_epoch: int = setting(2, ge=1)
    """Optimizer steps per pass over a rollout batch, each over an equal share of its micro-batches
    (an odd count splits into a longer and a shorter step). Flow-GRPO makes 2: the second half of
    the batch then trains off-policy and the PPO clip acts. 1 = one on-policy step (every ratio 1)."""
    ema_every: int = setting(8, ge=1)
    """Update the EMA of the LoRA weights every N optimizer steps (Flow-GRPO: 8)."""
    ema_warmup: bool = True
    """EMA decay min(ema_decay, (1 + n) / (10 + n)) at optimizer step n (Flow-GRPO's warm-up), so
    early EMA weights follow the policy instead of staying near the initial LoRA."""
    loss: str = setting("grpo", choices=POLICY_LOSS_NAMES)
    """Policy loss. grpo: PPO-clip on the trained steps' log-probs (Flow-GRPO). nft (experimental,
    ours): negative-aware flow matching on the final samples at random steps of the sampler's grid
    (DiffusionNFT's idea, docs/method/extensions.md "The nft loss"): first-order in the model, needs
    no log-probs, and any sampler's samples train it; kl_beta then weighs ``mean (v_theta -
    v_base)^2`` at the trained point. Measured on mini: a brightness update's signal 0.0270 against
    grpo's 0.0117 (docs/experiments/2026-11-30-nft-loss.md)."""
    experimental: TrainExperimental = field(default_factory=TrainExperimental)
    """Research settings of training (train.experimental.*)."""


@dataclass
class PromptsConfig:
    train: str = setting("builtin:mixed", nonempty=True)
    """Training prompts: a .txt (one per line) or .jsonl ({"prompt": ...}) file, or builtin:NAME."""
    eval: str = setting("builtin:mixed_eval", nonempty=True)
    """Held-out evaluation prompts (same formats)."""


@dataclass
class EvalConfig:
    every: int = setting(50, ge=0)
    """Evaluate at step 0, every N steps and at the end; 0 disables evaluation."""
    num_steps: int = setting(40, ge=1, le=1000)
    """ODE steps of evaluation sampling."""
    guidance_scale: float = setting(4.5, ge=0)
    """CFG of evaluation sampling (FLUX.1-dev: its distilled guidance)."""
    true_cfg_scale: float = setting(1.0, ge=1)
    """FLUX only: true CFG of evaluation sampling, as ``sampling.true_cfg_scale`` (diffusers'
    ``true_cfg_scale``); 1 = off. Doubles the forwards. SD3 refuses it."""
    num_prompts: int = setting(64, ge=1)
    """Held-out prompts used (the first N of the eval set)."""
    seed: int = setting(1234, ge=0, le=2**32 - 1)
    """Seed of the fixed evaluation noise (identical at every evaluation)."""
    batch_size: int = setting(16, ge=1)
    """Samples per evaluation forward."""
    objectives: list[str] | None = setting(None, nonempty=True)
    """Objectives scored at evaluation; None = the trained objectives (may add untrained ones)."""
    use_ema: bool = True
    """Evaluate the EMA weights when train.ema_decay > 0."""


@dataclass
class LoggingConfig:
    tracker: str = setting("none", choices=("none", "tensorboard", "wandb"))
    """Experiment tracker through accelerate: none, tensorboard or wandb."""
    progress: bool = True
    """Show the rich progress display."""


def _objective_names(objectives: list[str]) -> list[str]:
    """What a resumed run must keep: the rewards, not where they are served (``deqa@URL``)."""
    return [o.partition("@")[0].strip() for o in objectives]


@dataclass
class Config:
    objectives: list[str] = setting(
        default_factory=lambda: ["pick", "deqa", "aes", "ocr"],
        nonempty=True,
        resume="refuse",
        resume_key=_objective_names,
    )
    """Reward names to optimise (see ``apex score --help`` for the list)."""
    name: str | None = None
    """Run name (default: the output folder's name)."""
    preset: str | None = None
    """The preset this config started from (informational)."""
    out: str = setting("runs/apex", nonempty=True)
    """Run directory: config, metrics, checkpoints, evaluations."""
    seed: int = setting(42, ge=0, le=2**32 - 1, resume="refuse")
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
    """A run config from its dict, as a run's ``config.yaml`` holds it. A config written by an
    older apex has its old keys rewritten into today's first (``apexcli.config_upgrade``); a key
    that no version had is an error naming it."""
    upgraded, _ = upgrade_config(data)
    return from_dict(Config, upgraded)


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


def preset_files():
    """The folder of the shipped presets (``src/apexcli/presets``)."""
    return resources.files("apexcli.presets")


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in preset_files().iterdir() if p.name.endswith(".yaml"))


PRESET_BASE_KEY = "base"
"""A preset's key naming the preset it inherits from: its own keys are deep-merged over that one's."""


def load_preset(name: str) -> dict:
    """The preset's keys, over those of the preset its ``base:`` names (recursively)."""
    data = _load_preset_chain(name, ())
    data["preset"] = name
    return data


def _load_preset_chain(name: str, seen: tuple[str, ...]) -> dict:
    if name in seen:
        raise ApexError(
            f"preset '{seen[0]}' inherits from itself: {' -> '.join((*seen, name))}; remove one of the base: keys"
        )
    path = preset_files() / f"{name}.yaml"
    if not path.is_file():
        if seen:
            raise ApexError(
                f"preset '{seen[-1]}' has base: {name}, which is not a preset; valid: {', '.join(preset_names())}"
            )
        raise ApexError(f"unknown preset '{name}'; valid: {', '.join(preset_names())}")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ApexError(f"preset '{name}' must hold a mapping at the top level")
    base = data.pop(PRESET_BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise ApexError(f"preset '{name}' has base: {base!r}; give the name of another preset")
    return deep_merge(_load_preset_chain(base.strip(), (*seen, name)), data)


def load_yaml_file(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ApexError(f"config file '{path}' is a directory; give a YAML file (e.g. {path / 'config.yaml'})")
    if not path.is_file():
        raise ApexError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ApexError(
            f"config file '{path}' is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from None
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
        layer = load_preset(preset)
        reject_old_keys(layer, f"in preset {preset}")
        data = deep_merge(data, layer)
    if config_file:
        # may be an older run's config.yaml: its old keys are rewritten, and what could not be kept is said
        layer, notes = upgrade_config(load_yaml_file(config_file))
        if notes:
            print(f"note: {config_file} holds settings this apex no longer has: {'; '.join(notes)}", file=sys.stderr)
        data = deep_merge(data, layer)
    if options:
        reject_old_keys(options)
        data = deep_merge(data, options)
    for text in overrides or []:
        layer = parse_override(text)
        reject_old_keys(layer)
        data = deep_merge(data, layer)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ApexError(f"config key '{key}' {message}")


def validate(cfg: Config) -> None:
    """Every field against the rule declared beside it (``setting(...)``: finite numbers, ranges,
    choices), then the checks that relate several fields. Objective names are checked against the
    reward registry when the reward suite is built."""
    check_fields(cfg)
    t, s, m = cfg.train, cfg.sampling, cfg.model
    _check(len(set(cfg.objectives)) == len(cfg.objectives), "objectives", f"has duplicates: {cfg.objectives}")
    _check(m.resolution % 16 == 0, "model.resolution", f"must be a positive multiple of 16, got {m.resolution}")
    total = t.group_size * t.prompts_per_step
    _check(
        total % t.rollout_batch_size == 0,
        "train.rollout_batch_size",
        f"({t.rollout_batch_size}) must divide group_size x prompts_per_step ({total})",
    )
    _check(
        total % t.train_batch_size == 0,
        "train.train_batch_size",
        f"({t.train_batch_size}) must divide group_size x prompts_per_step ({total})",
    )
    _check(
        t.window_start < s.num_steps, "train.window_start", f"must be in [0, sampling.num_steps), got {t.window_start}"
    )
    _check(
        t.window_start + t.window_size <= s.num_steps,
        "train.window_size",
        f"window [{t.window_start}, {t.window_start + t.window_size}) exceeds sampling.num_steps={s.num_steps}",
    )
    sx, tx = s.experimental, t.experimental
    _check(
        sx.noise_block == 1 or s.sampler == "sde",
        "sampling.experimental.noise_block",
        f"({sx.noise_block}) needs sampling.sampler=sde, got {s.sampler}; set sampling.experimental.noise_block=1",
    )
    if t.loss == "nft":
        _check(
            tx.anchor_beta == 0,
            "train.experimental.anchor_beta",
            f"({tx.anchor_beta}) holds the steps grpo does not train; train.loss=nft trains every step: "
            "set train.experimental.anchor_beta=0",
        )
        _check(
            tx.nft_timesteps <= s.num_steps,
            "train.experimental.nft_timesteps",
            f"({tx.nft_timesteps}) exceeds the sampler's {s.num_steps} steps; set train.experimental.nft_timesteps<={s.num_steps}",
        )
    _balance_rules(cfg.balance, len(cfg.objectives))


def validate_balance(b: BalanceConfig, n_objectives: int | None = None) -> None:
    """The balance section alone (``build_balancer`` without a run config): every field against its
    rule, then the rules that relate its fields; ``n_objectives`` enables the per-objective lengths."""
    check_fields(b, "balance.")
    _balance_rules(b, n_objectives)


def _balance_rules(b: BalanceConfig, n_objectives: int | None) -> None:
    if b.weights is not None:
        w = list(b.weights)
        if n_objectives is not None:
            _check(
                len(w) == n_objectives,
                "balance.weights",
                f"has {len(w)} values but there are {n_objectives} objectives; give one weight per objective",
            )
        _check(sum(w) > 0, "balance.weights", f"must not all be 0, got {w}")
        if b.strategy == "apex":
            _check(
                all(x > 0 for x in w), "balance.weights", f"must be > 0 for apex (they enter as log-priors), got {w}"
            )
    targets = b.apex.targets
    if targets is not None and n_objectives is not None:
        _check(
            len(targets) == n_objectives,
            "balance.apex.targets",
            f"has {len(targets)} values but there are {n_objectives} objectives; give one target per objective",
        )
    pp = b.experimental.progress_prompts
    _check(
        pp == 0 or b.probe_every > 0,
        "balance.experimental.progress_prompts",
        f"needs balance.probe_every > 0 (its period), got probe_every {b.probe_every}; set one or progress_prompts=0",
    )


EXPERIMENTAL_SECTION = "experimental"
"""The name of each area's section of research settings (``train.experimental``, ...)."""

EXPERIMENTAL_VALUES: dict[str, tuple[str, ...]] = {"train.loss": ("nft",), "sampling.sampler": ("cps_gaussian",)}
"""Values of regular keys that are research settings of ours (docs/method/extensions.md)."""


def experimental_settings(cfg: Config) -> list[str]:
    """``key=value`` of every research setting ``cfg`` makes: an experimental value of a regular
    key (``EXPERIMENTAL_VALUES``), then each key of an ``experimental`` section that differs from
    its default. Empty for a config that trains only what Flow-GRPO and the APEX paper describe."""
    out = []
    for key, values in EXPERIMENTAL_VALUES.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section), name)
        if value in values:
            out.append(f"{key}={value}")
    for key, value, default in _experimental_fields(cfg, ""):
        if value != default:
            out.append(f"{key}={_yaml_text(value)}")
    return out


def _experimental_fields(obj, prefix: str):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(value):
            continue
        if f.name == EXPERIMENTAL_SECTION:
            defaults = type(value)()
            for g in dataclasses.fields(value):
                yield f"{prefix}{f.name}.{g.name}", getattr(value, g.name), getattr(defaults, g.name)
        else:
            yield from _experimental_fields(value, f"{prefix}{f.name}.")


def _yaml_text(value) -> str:
    """A value as an override would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def trained_steps(cfg: Config) -> list[int]:
    """Indices of the denoising steps that are stochastic and trained."""
    t, n = cfg.train, cfg.sampling.num_steps
    size = t.window_size or (n - 1 - t.window_start)
    return list(range(t.window_start, t.window_start + max(size, 1)))
