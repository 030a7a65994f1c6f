"""LoRA on the flow transformer (SD3 or FLUX) through peft, saved and loaded in diffusers' format.

Saved files are what the family's pipeline (``StableDiffusion3Pipeline`` / ``FluxPipeline``)
reads with ``load_lora_weights(dir)``: ``pytorch_lora_weights.safetensors`` with keys
``transformer.<module>.lora_A.weight``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from apexcli.backbones import backbone_of, backbone_of_pipeline
from apexcli.errors import ApexError
from apexcli.runs import LORA_FILE, RunDir
from apexcli.sharding import is_sharded, shard_like

ADAPTER = "default"


LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}
"""lora.init -> peft's ``init_lora_weights``: Kaiming-uniform A (peft's default) or A ~ N(0, std 1/r)."""


def attach_lora(
    transformer, *, rank: int, alpha: int, dropout: float, target_modules: list[str], seed: int, init: str = "kaiming"
) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter (B = 0, so the policy starts equal to the base model) and return its
    trainable parameters, kept in float32 whatever the base dtype. ``init`` picks A's
    initialisation (``LORA_INITS``)."""
    if init not in LORA_INITS:
        raise ApexError(f"lora.init must be one of {', '.join(LORA_INITS)}, got '{init}'")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=LORA_INITS[init],
        target_modules=target_modules,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            transformer.add_adapter(config, adapter_name=ADAPTER)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError when no target matches
            if "not found" not in str(exc):
                raise
            raise ApexError(f"lora.target_modules {target_modules} matched no module of the transformer") from None
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ApexError(f"lora.target_modules {target_modules} matched no module of the transformer")
    for p in params:
        p.data = p.data.float()
    return params


def adapter_layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The peft layers of the model, found once: diffusers' ``disable_adapters`` walks every
    module on each call, which the KL reference would pay on every micro-batch."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(layers: list[torch.nn.Module]) -> Iterator[None]:
    """The base model alone (LoRA off) inside the block; the adapters are re-enabled after."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(transformer, full_state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter weights keyed as peft names them (no 'transformer.' prefix). Under FSDP pass the
    gathered ``accelerator.get_state_dict(model)``: the module's own tensors are shards."""
    state = get_peft_model_state_dict(transformer, state_dict=full_state_dict, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}


def save_lora(transformer, directory: Path, full_state_dict: dict | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors``. The adapter config (rank, alpha, targets) goes
    into the file's metadata: without it ``load_lora_weights`` assumes alpha = rank and applies
    the LoRA with the wrong scale (alpha / rank) whenever alpha != rank."""
    backbone_of(transformer).pipeline_type().save_lora_weights(
        save_directory=str(directory),
        transformer_lora_layers=lora_state_dict(transformer, full_state_dict),
        safe_serialization=True,
        transformer_lora_adapter_metadata=adapter_metadata(transformer),
    )
    path = Path(directory) / LORA_FILE
    _sort_metadata_keys(path)
    return path


def _sort_metadata_keys(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys in sorted order. safetensors
    writes them from a hash map, in an order that changes from process to process, so two
    identical runs would write files that differ in the header alone. Same length, same data."""
    with open(path, "r+b") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        raw = f.read(size)
        header = json.loads(raw)
        meta = header.pop("__metadata__", None)
        if meta is None:
            return
        text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":")).encode()
        if len(text) > size:  # never: the same content; leave the file as it is rather than move the data
            return
        f.seek(8)
        f.write(text + b" " * (size - len(text)))


def adapter_metadata(transformer) -> dict:
    """The adapter config as saved: sets (target modules) as sorted lists, so two identical runs
    write byte-identical files (a set's order changes with each process's string hashing)."""
    config = transformer.peft_config[ADAPTER].to_dict()
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.items()}


def load_lora_into_adapter(transformer, directory: Path) -> None:
    """Load saved weights into the already-attached trainable adapter (used by resume)."""
    # weight_name given: without it diffusers refuses a local dir when HF_HUB_OFFLINE=1
    state = backbone_of(transformer).pipeline_type().lora_state_dict(str(directory), weight_name=LORA_FILE)
    if isinstance(state, tuple):  # some diffusers versions return (state, alphas)
        state = state[0]
    state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    state = convert_unet_state_dict_to_peft(state)
    state = _laid_out_like_adapter(transformer, state)
    hint = "check that lora.rank/target_modules match the run that saved it"
    try:
        result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    except RuntimeError as exc:  # shape mismatch: another rank
        first = next((line.strip() for line in str(exc).splitlines() if "mismatch" in line), str(exc).splitlines()[0])
        raise ApexError(f"LoRA in '{directory}' does not fit this model ({first[:160]}); {hint}") from None
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ApexError(
            f"LoRA in '{directory}' does not fit this model (unexpected keys, e.g. {unexpected[0]}); {hint}"
        )
    # missing_keys lists every base weight too; only adapter weights left untouched matter
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]
    if missing:
        raise ApexError(f"LoRA in '{directory}' does not fit this model (missing keys, e.g. {missing[0]}); {hint}")


def _laid_out_like_adapter(transformer, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Under FSDP2 the adapter's parameters are DTensor shards: slice each saved whole tensor the
    same way, or ``load_state_dict`` cannot copy it in. Plain parameters need nothing."""
    params = {name.replace(f".{ADAPTER}.", "."): p for name, p in transformer.named_parameters() if "lora_" in name}
    if not is_sharded(params.values()):
        return state
    return {k: shard_like(v, params[k]) if k in params else v for k, v in state.items()}


def resolve_lora_path(path: str | Path, option: str = "--lora") -> Path:
    """A checkpoint dir, a LoRA .safetensors file's dir, or a run dir (its latest checkpoint).
    ``option`` is the command's own name for it, used in the errors (``--checkpoint`` in eval).
    For a file, the caller loads that very file: the dir returned only locates it."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ApexError(
                f"{option} '{p}' is a {p.suffix or 'extension-less'} file, not a LoRA; give a .safetensors file, a checkpoint dir or a run dir"
            )
        return p.parent
    if (p / LORA_FILE).is_file():
        return p
    if p.is_dir():
        latest = RunDir(p).latest_checkpoint()
        if latest is not None:
            return latest
        raise ApexError(f"{option} '{p}' holds no {LORA_FILE} and no checkpoints/step-*/ with one")
    raise ApexError(f"{option} '{p}' does not exist; give a checkpoint dir, a run dir or a .safetensors file")


# LoRA entries beyond this magnitude are corrupt or hostile, never trained: a trained LoRA's
# factors stay within a few units (Kaiming or N(0, 1/r) A, small B), and 1e30 entries (applied
# without a word before) turn every image black.
MAX_LORA_ABS = 1e3


def check_lora_tensors(state: dict[str, torch.Tensor], weight_file: Path, option: str = "--lora") -> None:
    """ApexError naming the file and tensor for what ``load_lora_weights`` would fail on with a
    traceback or apply in silence: a tensor that is not a floating-point matrix, non-finite or
    absurd values, or A and B factors of one layer with different ranks."""
    where = f"{option} file '{weight_file}'"
    for key, tensor in state.items():
        if tensor.ndim != 2:
            raise ApexError(f"{where}: '{key}' has shape {tuple(tensor.shape)}; LoRA factors are matrices (2-D)")
        if not tensor.is_floating_point():
            raise ApexError(
                f"{where}: '{key}' holds {str(tensor.dtype).replace('torch.', '')} values; LoRA factors are floating point"
            )
        values = tensor.detach().float()
        if not torch.isfinite(values).all():
            raise ApexError(f"{where}: '{key}' holds NaN or infinite values; the file is corrupt")
        largest = float(values.abs().max()) if values.numel() else 0.0
        if largest > MAX_LORA_ABS:
            raise ApexError(
                f"{where}: '{key}' holds a value of magnitude {largest:.3g}, beyond {MAX_LORA_ABS:g}: "
                "no trained LoRA has such entries; the file is corrupt"
            )
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b = state.get(key.replace(".lora_A.", ".lora_B."))
        if b is not None and a.shape[0] != b.shape[1]:
            raise ApexError(
                f"{where}: '{key}' has rank {a.shape[0]} but its lora_B has rank {b.shape[1]}; "
                "the factors of one layer must share their rank"
            )


def load_lora_for_inference(pipe, weight_file: Path, option: str = "--lora") -> int:
    """``pipe.load_lora_weights`` with the checks it lacks: a file that is not safetensors, a
    LoRA of another model (UNet keys, other module names or shapes), or tensors it would choke
    on or apply in silence (``check_lora_tensors``) is an ApexError naming the file (and the
    command's ``option``) instead of a traceback, a silent no-op or black images. Returns the
    number of transformer LoRA tensors applied."""
    weight_file = Path(weight_file)
    where = f"{option} file '{weight_file}'"
    backbone = backbone_of_pipeline(pipe)
    try:
        state = backbone.pipeline_type().lora_state_dict(str(weight_file.parent), weight_name=weight_file.name)
    except Exception as exc:  # safetensors' header errors, diffusers' format guesses
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ApexError(f"{where} is not a readable LoRA safetensors file ({first})") from None
    if isinstance(state, tuple):  # some diffusers versions return (state, alphas)
        state = state[0]
    ours = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
    if not ours:
        example = next(iter(state), "no keys at all")
        raise ApexError(
            f"{where} holds no {backbone.family.upper()} transformer LoRA weights (e.g. '{example}'): it was made for another model"
        )
    ours = convert_unet_state_dict_to_peft(ours)
    check_lora_tensors(ours, weight_file, option)
    modules = dict(pipe.transformer.named_modules())
    for key, tensor in ours.items():
        name, _, kind = key.rpartition(".lora_")
        module = modules.get(name)
        if module is None or not hasattr(module, "in_features"):
            raise ApexError(f"{where} does not fit this model: it has no layer '{name}' (a LoRA for another model?)")
        want = module.in_features if kind.startswith("A") else module.out_features
        got = tensor.shape[1] if kind.startswith("A") else tensor.shape[0]
        if got != want:
            raise ApexError(
                f"{where} does not fit this model: '{key}' has shape {tuple(tensor.shape)}, "
                f"the layer has {want} {'inputs' if kind.startswith('A') else 'outputs'} (a LoRA for another model size?)"
            )
    before = _lora_tensor_count(pipe.transformer)
    pipe.load_lora_weights(str(weight_file.parent), weight_name=weight_file.name)
    applied = _lora_tensor_count(pipe.transformer) - before
    if applied != len(ours):
        raise ApexError(f"{where}: only {applied} of its {len(ours)} transformer tensors were applied")
    return applied


def _lora_tensor_count(transformer) -> int:
    return sum(1 for name, _ in transformer.named_parameters() if ".lora_A." in name or ".lora_B." in name)
