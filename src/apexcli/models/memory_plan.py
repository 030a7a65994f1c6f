"""The GPU memory plan of a training config, computed on PyTorch's meta device (no weights, no GPU).

Every module is built on the meta device from its published config (``models/architectures.py``),
so parameter and buffer counts are exact. A meta forward and backward runs the same Python and the
same autograd as a real one: what autograd keeps, and when each tensor dies, are the same; only no
memory is touched. Two counts come out of it:

- saved tensors (``SavedBytes``) per transformer block: every save (raw) and each storage once
  (unique: a tensor saved by two ops, or two views of one buffer, hold one allocation), the frozen
  weights that linear layers save left out (they are resident, not activations);
- live bytes (``LiveBytes``): each storage an op creates, from its creation until its last
  reference dies. Its peak over one training micro-step is what ``torch.cuda.max_memory_allocated``
  adds to the resident weights, kernel-internal workspaces excepted. Saved tensors alone miss the
  backward: with gradient checkpointing the peak is the kept block inputs plus one block's
  recomputed tensors AND the transient gradients of its backward.

Attention runs through ``aten._scaled_dot_product_flash_attention_for_cpu`` (``fused_attention``),
which keeps what the GPU's fused kernels keep (q, k, v, the output and a float32 log-sum-exp); the
meta device's default, the math path, would keep ``[B, heads, L, L]`` scores no GPU run keeps.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from apexcli.models import architectures as arch

if TYPE_CHECKING:
    from apexcli.config import Config

GB = 1e9
DEQA_PARAMS_PUBLISHED = 8.2e9
"""mPLUG-Owl2 (LLaMA-2-7B + ViT-L/14 + abstractor), from its paper: remote code, not built here."""
AES_MLP_PARAMS = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
"""The LAION aesthetic head (768-1024-128-64-16-1), from the published file's shapes."""
POS_EMBED_BUILD_BYTES_PER_VALUE = 16.09
"""Peak host RSS of building an SD3 ``PatchEmbed``, per value of its ``pos_embed`` table: diffusers
computes the sincos table in float64 (two [grid^2, dim] copies at once) before casting it.
Measured by ``benchmarks/memory_measure.py`` (16.09 for SD3.5-M's 384 x 384 x 1536 table); every
``from_pretrained`` of the transformer pays it, whatever the weights."""
SIGMA_MAX = 0.97
"""Stand-in for a trajectory's ``sigma_max`` (the step math's shapes do not depend on it)."""


# --------------------------------------------------------------------------- accounting tools


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage (its StorageImpl), shared by every view of one allocation. On a
    real device it partitions tensors as the storage's ``data_ptr`` does; meta tensors have none."""
    return t.untyped_storage()._cdata


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def resident_keys(module: torch.nn.Module) -> set[int]:
    """Storages of ``module``'s parameters and buffers."""
    return {storage_key(t) for t in (*module.parameters(), *module.buffers())}


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create inside the mode and that are still referenced.

    A storage counts from the op that returns it until its last reference dies (a weakref callback
    on the storage: PyTorch keeps a storage's Python object as long as the storage lives). An
    output sharing an input's storage (a view, an in-place op) is no new allocation. ``peak`` is
    the maximum of ``now``; ``open_window(name)`` / ``close_window(name)`` give the maximum over
    a stretch of the run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._windows: dict[str, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def open_window(self, name: str) -> int:
        """Start tracking the peak of a stretch named ``name``; returns the level it starts at."""
        self._windows[name] = self.now
        return self.now

    def close_window(self, name: str) -> int:
        """The peak since ``open_window(name)``."""
        return self._windows.pop(name)

    def _freed(self, key: int, nbytes: int) -> Callable[[weakref.ref], None]:
        def callback(_ref: weakref.ref) -> None:
            if self._refs.pop(key, None) is not None:
                self.now -= nbytes

        return callback

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, self._freed(key, nbytes))
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        for name, peak in self._windows.items():
            if self.now > peak:
                self._windows[name] = self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage_key(t) for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            if storage_key(t) not in inputs:
                self._track(t.untyped_storage())
        return out


_SDPA = F.scaled_dot_product_attention


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p or enable_gqa:
        return _SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal, scale=scale)[0]


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    """Inside the block, ``F.scaled_dot_product_attention`` runs the fused CPU flash kernel on any
    device that has it (CPU, meta): it keeps q, k, v, out and a float32 log-sum-exp for the
    backward, as the GPU's flash / cuDNN / efficient kernels do. A patch of the function, not a
    TorchFunctionMode: checkpointing recomputes blocks inside the autograd engine, where no
    function mode is active. Calls with a mask, dropout or GQA run unchanged."""
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


@dataclass
class SavedBytes:
    """Tensors autograd saves for the backward, attributed to the transformer block running when
    each is saved (block -1: outside every block). ``raw`` adds every save (a tensor saved twice
    counts twice); ``unique`` adds each storage once, leaving out the parameters and buffers
    (``exclude``: resident, not activations)."""

    exclude: set[int]
    records: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    """Per save: (block, storage key, storage data_ptr, bytes of the saved view, bytes of its storage)."""
    current: int = -1

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self.records.append((self.current, s._cdata, s.data_ptr(), t.numel() * t.element_size(), s.nbytes()))
        return t

    def raw(self, block: int) -> int:
        return sum(r[3] for r in self.records if r[0] == block)

    def unique(self, block: int, by_data_ptr: bool = False) -> int:
        """Each storage ``block`` saves, once; keyed by its data pointer (real devices only) or by
        the storage itself."""
        resident = {r[2] for r in self.records if r[1] in self.exclude} if by_data_ptr else self.exclude
        sizes = {r[2] if by_data_ptr else r[1]: r[4] for r in self.records if r[0] == block}
        return sum(size for key, size in sizes.items() if key not in resident)


# --------------------------------------------------------------------------- one training micro-step


@dataclass(frozen=True)
class StepShape:
    """The shapes of one training micro-batch."""

    samples: int
    latent_hw: int
    text_tokens: int
    guidance_scale: float

    @property
    def forward_batch(self) -> int:
        """With CFG every transformer forward runs the batch ``[uncond, cond]``: twice the samples."""
        return self.samples * (2 if self.guidance_scale > 1 else 1)

    @property
    def image_tokens(self) -> int:
        return (self.latent_hw // arch.SD35M_TRANSFORMER["patch_size"]) ** 2


@dataclass(frozen=True)
class StepOptions:
    """The trainer settings that shape a micro-step's graph."""

    guidance_scale: float = 4.5
    noise_level: float = 0.7
    kl_beta: float = 0.04
    kl_form: str = "reference"
    clip_range: float = 1e-4


def step_inputs(config: dict, shape: StepShape, device: torch.device | str, seed: int = 0) -> dict:
    """What the trainer feeds one GRPO micro-step of a transformer built from ``config``: float32
    latents of a stored transition, per-sample noise levels, cached prompt embeddings (the
    unconditional ones with batch 1), advantages. Random on a real device, empty on meta."""
    from apexcli.flow.rollout import PromptEmbeds

    n, hw, tokens = shape.samples, shape.latent_hw, shape.text_tokens
    channels, joint, pooled = config["in_channels"], config["joint_attention_dim"], config["pooled_projection_dim"]
    gen = torch.Generator().manual_seed(seed)

    def draw(*size: int) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(size, device="meta")
        return torch.randn(size, generator=gen).to(device)

    sigma = torch.full((n,), 0.8, device=device)
    return dict(
        x=draw(n, channels, hw, hw),
        x_next=draw(n, channels, hw, hw),
        sigma=sigma,
        sigma_next=sigma - 0.1,
        cond=PromptEmbeds(draw(n, tokens, joint), draw(n, pooled)),
        uncond=PromptEmbeds(draw(1, tokens, joint), draw(1, pooled)),
        old_log_prob=draw(n),
        advantages=draw(n),
    )


def allocate_lora_grads(model: torch.nn.Module) -> None:
    """Give every trainable parameter its gradient buffer. They are resident (the plan's "LoRA
    gradients" row), and every micro-step after an update's first only accumulates into them."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def run_micro_step(model: torch.nn.Module, inputs: dict, opts: StepOptions, mark: Callable[[str], None]) -> None:
    """One GRPO micro-step as ``Trainer._update`` runs it: the policy's log-prob of the stored step
    (grad through the LoRA), the reference's under ``no_grad`` with the adapters off, the clipped
    loss with the KL term, the backward. ``mark(phase)`` is called as each phase begins."""
    from apexcli.flow.rollout import step_log_prob
    from apexcli.models.lora import adapter_layers, adapters_disabled
    from apexcli.train.loss import grpo_policy_loss, step_kl

    i = inputs
    args = (i["x"], i["x_next"], i["sigma"], i["sigma_next"], i["cond"])
    call = dict(
        guidance_scale=opts.guidance_scale,
        uncond=i["uncond"],
        sampler="sde",
        noise_level=opts.noise_level,
        sigma_max=SIGMA_MAX,
    )
    mark("forward")
    out = step_log_prob(model, *args, **call)
    kl = None
    if opts.kl_beta > 0:
        mark("reference")
        with torch.no_grad(), adapters_disabled(adapter_layers(model)):
            ref = step_log_prob(model, *args, **call)
        kl = step_kl(out, ref, opts.kl_form)
    loss = grpo_policy_loss(
        out.log_prob, i["old_log_prob"], i["advantages"], clip_range=opts.clip_range, kl=kl, kl_beta=opts.kl_beta
    ).loss
    mark("backward")
    loss.backward()
    mark("end")


@dataclass(frozen=True)
class StepMemory:
    """Memory of one training micro-step, in bytes above what was allocated before it."""

    shape: StepShape
    checkpointing: bool
    kept: int
    """Live after the policy forward: what its backward needs, held through the reference forward."""
    reference_peak: int
    """Peak during the no-grad reference forward (the KL term)."""
    backward_peak: int
    """Peak during the backward (with checkpointing: each block recomputed, then differentiated)."""
    peak: int
    """The step's peak: what it adds to the resident memory."""
    outside_saved: int
    """Saved outside the blocks (unique storages); with checkpointing, the block inputs too."""
    block_saved_raw: tuple[int, ...] = ()
    """Per block, without checkpointing: every tensor it saves, summed."""
    block_saved: tuple[int, ...] = ()
    """Per block, without checkpointing: each storage it saves once, parameters left out."""
    block_saved_by_data_ptr: tuple[int, ...] = ()
    """``block_saved`` keyed by data pointer (real devices only)."""
    block_working_set: tuple[int, ...] = ()
    """Per block, with checkpointing: the most its recompute and backward add above the level at
    which its recompute starts."""


class _Timeline:
    """Peaks of a micro-step's phases, and of each block's recompute + backward."""

    def __init__(self, live: LiveBytes, saved: SavedBytes) -> None:
        self.live, self.saved = live, saved
        self.phases: dict[str, tuple[int, int]] = {}  # phase -> (level at its start, its peak)
        self.blocks: dict[int, int] = {}  # block -> most its recompute + backward added
        self.phase, self.start, self.block, self.block_start = "", 0, -1, 0

    def _close_block(self) -> None:
        if self.block >= 0:
            added = self.live.close_window("block") - self.block_start
            self.blocks[self.block] = max(self.blocks.get(self.block, 0), added)
        self.block = -1

    def mark(self, phase: str) -> None:
        """A phase of the micro-step begins (``run_micro_step``)."""
        self._close_block()
        if self.phase:
            self.phases[self.phase] = (self.start, self.live.close_window("phase"))
        self.phase, self.start = phase, self.live.open_window("phase")

    def enter_block(self, index: int) -> None:
        """A block's forward starts (in the backward: its recompute)."""
        self.saved.current = index
        if self.phase == "backward" and index != self.block:
            self._close_block()
            self.block, self.block_start = index, self.live.open_window("block")


def step_memory(
    model: torch.nn.Module, inputs: dict, shape: StepShape, *, checkpointing: bool, opts: StepOptions | None = None
) -> StepMemory:
    """Run one micro-step of ``model`` (an SD3 transformer with LoRA, on meta or a real device) on
    ``inputs`` (``step_inputs``) and account for its memory. Call ``allocate_lora_grads`` first."""
    opts = opts or StepOptions(guidance_scale=shape.guidance_scale)
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    blocks = list(model.transformer_blocks)
    saved, live = SavedBytes(exclude=resident_keys(model)), LiveBytes()
    timeline = _Timeline(live, saved)
    handles = [b.register_forward_pre_hook(lambda *_, i=i: timeline.enter_block(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: setattr(saved, "current", -1)) for b in blocks]
    try:
        with fused_attention(), live, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            run_micro_step(model, inputs, opts, timeline.mark)
    finally:
        for h in handles:
            h.remove()
    phases, n = timeline.phases, len(blocks)
    by_pointer = next(model.parameters()).device.type != "meta" and not checkpointing
    return StepMemory(
        shape=shape,
        checkpointing=checkpointing,
        kept=phases["reference" if "reference" in phases else "backward"][0],
        reference_peak=phases.get("reference", (0, 0))[1],
        backward_peak=phases["backward"][1],
        peak=max(p for _, p in phases.values()),
        outside_saved=saved.unique(-1),
        block_saved_raw=() if checkpointing else tuple(saved.raw(b) for b in range(n)),
        block_saved=() if checkpointing else tuple(saved.unique(b) for b in range(n)),
        block_saved_by_data_ptr=tuple(saved.unique(b, by_data_ptr=True) for b in range(n)) if by_pointer else (),
        block_working_set=tuple(timeline.blocks.get(b, 0) for b in range(n)) if checkpointing else (),
    )


def forward_peak(model: torch.nn.Module, inputs: dict, guidance_scale: float) -> int:
    """Peak bytes a no-grad forward adds (a rollout step: one transformer call, CFG batched)."""
    from apexcli.flow.rollout import predict_velocity

    live = LiveBytes()
    with fused_attention(), live, torch.no_grad():
        predict_velocity(
            model, inputs["x"], inputs["sigma"], inputs["cond"], guidance_scale=guidance_scale, uncond=inputs["uncond"]
        )
    return live.peak


def cpu_allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator while ``fn()`` runs, counting what it allocates:
    the profiler's memory events carry the allocator's running total, the CPU's counterpart of
    ``torch.cuda.max_memory_allocated`` (kernel workspaces included)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    peak = 0
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


# --------------------------------------------------------------------------- the models, on meta


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' notices while building meta models (dtype casts)."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def sd3_transformer(
    config: dict, dtype: torch.dtype, device: str = "meta", lora: dict | None = None, seed: int = 0
) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` from ``config``, built in ``dtype`` (float32 first would double a
    real build's memory), its float32 buffers cast too as ``from_pretrained(torch_dtype=...)``
    leaves them; LoRA attached as the trainer does (``attach_lora(**lora)``)."""
    from diffusers import SD3Transformer2DModel

    from apexcli.models.lora import attach_lora

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with quiet_diffusers(), torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SD3Transformer2DModel.from_config(dict(config)).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    if lora is not None:
        attach_lora(model, **lora)
    return model


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_params() -> dict[str, int]:
    """Parameters of each model of the recipe, built on meta from its published config."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    with quiet_diffusers(), torch.device("meta"):
        pick = CLIPModel(
            CLIPConfig(
                text_config=dict(arch.CLIP_H_TEXT),
                vision_config=dict(arch.CLIP_H_VISION),
                projection_dim=arch.CLIP_H_PROJECTION,
            )
        )
        return {
            "vae": _n_params(AutoencoderKL.from_config(dict(arch.SD3_VAE))),
            "clip_l_text": _n_params(CLIPTextModelWithProjection(CLIPTextConfig(**arch.CLIP_L_TEXT))),
            "clip_g_text": _n_params(CLIPTextModelWithProjection(CLIPTextConfig(**arch.CLIP_G_TEXT))),
            "t5_xxl_encoder": _n_params(T5EncoderModel(T5Config(**arch.T5_XXL))),
            "pick_clip_h": _n_params(pick),
            "aes_clip_l_vision": _n_params(CLIPVisionModelWithProjection(CLIPVisionConfig(**arch.CLIP_L_VISION)))
            + AES_MLP_PARAMS,
        }


def compute_step_memory(
    config: dict,
    shape: StepShape,
    lora: dict,
    *,
    checkpointing: bool,
    opts: StepOptions | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> StepMemory:
    """``step_memory`` of a meta transformer built from ``config``: the plan's activation figure."""
    model = sd3_transformer(config, dtype, "meta", lora)
    allocate_lora_grads(model)
    return step_memory(model, step_inputs(config, shape, "meta"), shape, checkpointing=checkpointing, opts=opts)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlanRow:
    """One line of the plan."""

    key: str
    label: str
    nbytes: int
    where: str
    """``gpu`` (resident while training), ``transient`` (a working set on the GPU at some moment),
    ``encoding`` (on the GPU only while prompts are encoded), ``deqa`` (DeQA's server process,
    wherever it runs) or ``host`` (CPU RAM)."""
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The rows of a config's plan and its totals (bytes)."""

    rows: tuple[PlanRow, ...]
    step: StepMemory
    gpu_bytes: int | None = None

    def row(self, key: str) -> PlanRow:
        return next(r for r in self.rows if r.key == key)

    def resident(self, deqa_on_gpu: bool = False) -> int:
        """Held on the GPU through training (DeQA's server too when it shares the GPU)."""
        return sum(r.nbytes for r in self.rows if r.where == "gpu" or (deqa_on_gpu and r.where == "deqa"))

    def peak(self, deqa_on_gpu: bool = False) -> int:
        """Resident plus the largest working set (the training micro-step or a rollout forward)."""
        return self.resident(deqa_on_gpu) + max((r.nbytes for r in self.rows if r.where == "transient"), default=0)

    def encoding_peak(self, deqa_on_gpu: bool = False) -> int:
        """Resident plus the text encoders, as while prompts are encoded."""
        return self.resident(deqa_on_gpu) + sum(r.nbytes for r in self.rows if r.where == "encoding")

    def host_peak(self) -> int:
        """Host RAM to have free while loading: the transient of building the transformer plus
        every weight once (page cache when the files hold the model dtype, copies when converted)."""
        return sum(r.nbytes for r in self.rows if r.where == "host")

    def fits(self, deqa_on_gpu: bool = False) -> bool | None:
        """Whether both peaks fit ``gpu_bytes``; None when no GPU size was given."""
        if self.gpu_bytes is None:
            return None
        return max(self.peak(deqa_on_gpu), self.encoding_peak(deqa_on_gpu)) <= self.gpu_bytes


def transformer_config_for(cfg: Config) -> dict:
    """The transformer architecture ``model.pretrained`` names: a published SD3.5 release, or the
    ``transformer/config.json`` of a local pipeline directory (read, no weights)."""
    import json
    from pathlib import Path

    from apexcli.errors import ApexError
    from apexcli.models.loading import MINI_DIR

    name = cfg.model.pretrained
    for release, config in (
        ("stable-diffusion-3.5-large", arch.SD35L_TRANSFORMER),
        ("stable-diffusion-3.5-medium", arch.SD35M_TRANSFORMER),
    ):
        if name.rstrip("/").endswith(release):
            return dict(config)
    path = Path(str(MINI_DIR) if name == "mini" else name).expanduser() / "transformer" / "config.json"
    if path.is_file():
        config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        if "num_single_layers" in config:  # the plan measures SD3 transformers only
            raise ApexError(f"no memory plan for the FLUX transformer of model.pretrained '{name}' yet")
        return config
    raise ApexError(f"no memory plan for model.pretrained '{name}': give an SD3.5 release id or a pipeline directory")


def _objectives(cfg: Config) -> dict[str, bool]:
    """Trained and evaluated objectives -> whether a URL serves them (``name@URL``)."""
    out: dict[str, bool] = {}
    for objective in [*cfg.objectives, *(cfg.eval.objectives or [])]:
        name, at, _ = objective.partition("@")
        out[name.strip()] = out.get(name.strip(), False) or bool(at)
    return out


def _lora_rows(n: int, ema: bool) -> list[PlanRow]:
    rows = [
        PlanRow("lora_weights", "LoRA weights", 4 * n, "gpu", f"{n:,} parameters, float32"),
        PlanRow("lora_grads", "LoRA gradients", 4 * n, "gpu", "float32"),
        PlanRow("adamw_states", "AdamW states (m, v)", 8 * n, "gpu", "float32"),
    ]
    if ema:
        rows.append(PlanRow("lora_ema", "LoRA EMA", 4 * n, "gpu", "float32"))
    return rows


def reward_rows(cfg: Config, params: dict[str, int]) -> list[PlanRow]:
    """The reward towers, each ONCE: trainer, evaluator and progress probe share one suite."""
    from apexcli.rewards.base import resolve_dtype

    wanted, rows = _objectives(cfg), []
    for name, key, label in (
        ("pick", "pick_clip_h", "PickScore (CLIP-H/14)"),
        ("aes", "aes_clip_l_vision", "aesthetic (CLIP-L/14 vision + MLP)"),
    ):
        if name in wanted and not wanted[name]:
            dtype = resolve_dtype(getattr(cfg.rewards, name).dtype, torch.float32)
            size = torch.finfo(dtype).bits // 8
            detail = f"{params[key]:,} parameters, {str(dtype).removeprefix('torch.')}"
            rows.append(PlanRow(name, label, params[key] * size, "gpu", detail))
    if "deqa" in wanted:
        rows.append(
            PlanRow(
                "deqa",
                "DeQA-Score (its own server process)",
                int(DEQA_PARAMS_PUBLISHED * 2),
                "deqa",
                "~8.2e9 parameters (published), float16",
            )
        )
    return rows


def _weight_rows(model: torch.nn.Module, params: dict[str, int], size: int, cfg: Config) -> list[PlanRow]:
    """The base weights (buffers too), the text encoders, and the LoRA with its optimizer state."""
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())
    encoders = params["clip_l_text"] + params["clip_g_text"] + params["t5_xxl_encoder"]
    free = cfg.model.free_text_encoders
    return [
        PlanRow("transformer", "transformer weights", base * size, "gpu", f"{base:,} parameters"),
        PlanRow(
            "pos_embed", "transformer buffers (PatchEmbed pos_embed)", buffers * size, "gpu", f"{buffers:,} values"
        ),
        PlanRow("vae", "VAE (encoder + decoder)", params["vae"] * size, "gpu", f"{params['vae']:,} parameters"),
        PlanRow(
            "text_encoders",
            "CLIP-L + CLIP-G + T5-XXL text encoders",
            encoders * size,
            "encoding" if free else "gpu",
            f"{encoders:,} parameters, " + ("freed once prompts are embedded" if free else "kept (not freed)"),
        ),
        *_lora_rows(lora, cfg.train.ema_decay > 0),
    ]


def _data_rows(cfg: Config, config: dict, size: int) -> list[PlanRow]:
    """What one step keeps besides the models: its trajectories and its samples' prompt embeddings."""
    t, latent = cfg.train, cfg.model.resolution // 8
    samples, tokens = t.prompts_per_step * t.group_size, arch.CLIP_TOKENS + cfg.model.max_sequence_length
    steps = cfg.sampling.num_steps + 1
    embeds = samples * (tokens * config["joint_attention_dim"] + config["pooled_projection_dim"]) * size
    return [
        PlanRow(
            "trajectories",
            "trajectories of one step",
            samples * steps * config["in_channels"] * latent**2 * 4,
            "gpu",
            f"{samples} x {steps} latents, float32",
        ),
        PlanRow(
            "step_embeds", "prompt embeddings of one step's samples", embeds, "gpu", f"{samples} x {tokens} tokens"
        ),
    ]


def _work_rows(cfg: Config, config: dict, model: torch.nn.Module) -> tuple[list[PlanRow], StepMemory]:
    """The working sets: one training micro-step, one rollout forward."""
    t, s = cfg.train, cfg.sampling
    latent, tokens = cfg.model.resolution // 8, arch.CLIP_TOKENS + cfg.model.max_sequence_length
    shape = StepShape(t.train_batch_size, latent, tokens, s.guidance_scale)
    opts = StepOptions(s.guidance_scale, s.noise_level, t.kl_beta, t.kl_form, t.clip_range)
    ckpt = cfg.model.gradient_checkpointing
    allocate_lora_grads(model)
    step = step_memory(model, step_inputs(config, shape, "meta"), shape, checkpointing=ckpt, opts=opts)
    rollout_shape = StepShape(t.rollout_batch_size, latent, tokens, s.guidance_scale)
    rollout = forward_peak(model, step_inputs(config, rollout_shape, "meta"), s.guidance_scale)
    return [
        PlanRow(
            "train_step",
            "training micro-step (activations + backward)",
            step.peak,
            "transient",
            f"forward batch {shape.forward_batch}, {shape.image_tokens}+{tokens} tokens, "
            f"checkpointing {'on' if ckpt else 'off'}",
        ),
        PlanRow(
            "rollout_forward",
            "rollout forward (no grad)",
            rollout,
            "transient",
            f"forward batch {rollout_shape.forward_batch}",
        ),
    ], step


def _host_rows(model: torch.nn.Module, weight_rows: list[PlanRow]) -> list[PlanRow]:
    """Host RAM while ``from_pretrained`` loads the pipeline (measured: docs/memory.md)."""
    values = model.pos_embed.pos_embed.numel()
    weights = sum(r.nbytes for r in weight_rows if r.key in ("transformer", "pos_embed", "vae", "text_encoders"))
    return [
        PlanRow(
            "host_pos_embed_build",
            "host: building the transformer's pos_embed (float64, transient)",
            int(POS_EMBED_BUILD_BYTES_PER_VALUE * values),
            "host",
            f"{POS_EMBED_BUILD_BYTES_PER_VALUE} bytes x {values:,} values",
        ),
        PlanRow(
            "host_weights",
            "host: the pipeline's weights while loading",
            weights,
            "host",
            "page cache (mmapped) in the model dtype; copies when from_pretrained converts",
        ),
    ]


def plan_memory(cfg: Config, gpu_bytes: int | None = None, transformer: dict | None = None) -> MemoryPlan:
    """The memory plan of ``cfg`` on one GPU of ``gpu_bytes`` (None: no verdict), computed on the
    meta device from the published architectures in a few seconds. ``transformer``: another
    transformer config than ``model.pretrained``'s (a real-shape fixture's cut depth, say)."""
    from apexcli.models.loading import DTYPES as MODEL_DTYPES

    dtype = MODEL_DTYPES[cfg.model.dtype]
    size = torch.finfo(dtype).bits // 8
    config = dict(transformer) if transformer is not None else transformer_config_for(cfg)
    if "num_single_layers" in config:  # read as SD3, a FLUX config fails deep in a forward pass
        from apexcli.errors import ApexError

        raise ApexError(f"no memory plan for a FLUX transformer yet (model.pretrained '{cfg.model.pretrained}')")
    lora = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0, target_modules=cfg.lora.target_modules, seed=0)
    model = sd3_transformer(config, dtype, "meta", lora)
    params = component_params()
    weights = _weight_rows(model, params, size, cfg)
    work, step = _work_rows(cfg, config, model)
    rows = [*weights, *reward_rows(cfg, params), *_data_rows(cfg, config, size), *work, *_host_rows(model, weights)]
    return MemoryPlan(tuple(rows), step, gpu_bytes)
