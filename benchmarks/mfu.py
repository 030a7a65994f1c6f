"""FLOP counting and model-FLOP utilization (MFU) for the GPU benchmark.

    MFU = model FLOPs of the work done / wall time / the GPU's dense bf16 peak

"Model FLOPs" are counted once with ``torch.utils.flop_counter.FlopCounterMode`` on a twin of
the real module built on the ``meta`` device from the same config (same LoRA attached), so no
weights are allocated and no kernel runs. Two reasons for the meta twin: FlopCounterMode does
not count CPU SDPA kernels (the meta twin runs SDPA's math decomposition, whose matmuls it
counts), and counting a 2.5B-parameter model costs no device time. Recomputation by gradient
checkpointing is NOT model FLOPs (it is hardware FLOPs), so training MFU with checkpointing on
is computed from the same count as with it off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from apexcli.models.memory_plan import quiet_diffusers, sd3_transformer

# Dense (no sparsity) bf16 / fp16 tensor-core peaks in TFLOP/s, from the vendors' datasheets.
# Matched against torch.cuda.get_device_name() in order, first hit wins.
PEAK_TFLOPS_BF16: list[tuple[str, float]] = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM / "H100 80GB HBM3"
    ("H800", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
]


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the named GPU in TFLOP/s, or None when it is not in the table."""
    for key, value in PEAK_TFLOPS_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs that ``fn()`` executes (forward and, if it calls it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, peak_tflops_value: float | None) -> float | None:
    """``flops / seconds / peak``; None when the peak is unknown or the time is not positive."""
    if peak_tflops_value is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops_value * 1e12)


def meta_transformer(config: dict, dtype: torch.dtype, lora: dict | None = None) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` from ``config`` on the meta device, LoRA attached as the
    trainer does: the memory plan's builder, so FLOPs and memory count the same model."""
    return sd3_transformer(config, dtype, "meta", lora)


def transformer_flops(
    config: dict, *, batch: int, latent_hw: int, text_tokens: int, dtype: torch.dtype, lora: dict | None, train: bool
) -> int:
    """FLOPs of one transformer call on ``batch`` samples (meta twin).

    ``train=False``: the forward alone. ``train=True``: what one training micro-step runs per the
    trainer (``Trainer._update``): a forward + backward with grad through the LoRA, plus the
    no-grad reference forward with the adapter disabled (the KL term).
    """
    model = meta_transformer(config, dtype, lora)
    inputs = dict(
        hidden_states=torch.empty(batch, config["in_channels"], latent_hw, latent_hw, device="meta", dtype=dtype),
        timestep=torch.empty(batch, device="meta"),
        encoder_hidden_states=torch.empty(
            batch, text_tokens, config["joint_attention_dim"], device="meta", dtype=dtype
        ),
        pooled_projections=torch.empty(batch, config["pooled_projection_dim"], device="meta", dtype=dtype),
        return_dict=False,
    )

    def forward_only():
        with torch.no_grad():
            model(**inputs)

    def train_step():
        out = model(**inputs)[0]
        out.float().square().mean().backward()
        with torch.no_grad():
            model.disable_adapters()
            try:
                model(**inputs)
            finally:
                model.enable_adapters()

    return count_flops(train_step if train else forward_only)


def vae_decode_flops(vae_config: dict, *, batch: int, latent_hw: int, dtype: torch.dtype) -> int:
    """FLOPs of ``AutoencoderKL.decode`` on ``batch`` latents (meta twin)."""
    from diffusers import AutoencoderKL

    with quiet_diffusers(), torch.device("meta"):
        vae = AutoencoderKL.from_config(dict(vae_config)).to(dtype)
    z = torch.empty(batch, vae_config["latent_channels"], latent_hw, latent_hw, device="meta", dtype=dtype)

    def decode():
        with torch.no_grad():
            vae.decode(z, return_dict=False)

    return count_flops(decode)


def module_flops(build: Callable[[], torch.nn.Module], call: Callable[[torch.nn.Module], object]) -> int:
    """FLOPs of ``call(model)`` on ``build()`` made under the meta device (any nn.Module)."""
    with torch.device("meta"):
        model = build()

    def run():
        with torch.no_grad():
            call(model)

    return count_flops(run)
