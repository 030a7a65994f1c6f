"""CUDA checks (``pytest -m cuda tests/test_cuda.py``; skipped without an NVIDIA GPU).

Run by ``benchmarks/gpu_check.sh`` on a GPU machine:

1. a 2-step tiny training run on CUDA in bf16 through the CLI entry point;
2. the SD3.5-Medium MMDiT architecture (public config, random weights) at 512 px, batch 1:
   forward + backward with the LoRA of ``attach_lora`` (r=32 on the joint-attention
   projections), with gradient checkpointing off and on: same gradients, less memory;
3. a rollout on CUDA makes no host-device synchronization at all, on SD3 and on FLUX: its
   host-to-device copies go through pinned memory asynchronously, and nothing reads a GPU value
   on the host.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers import read_metrics, train_tiny

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (run benchmarks/gpu_check.sh)"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_tiny_two_steps_on_cuda_in_bf16(tmp_path):
    from apexcli.runs import LORA_FILE, RunDir

    out = train_tiny(tmp_path / "run", 2, "model.device=cuda", "model.dtype=bfloat16")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(
            math.isfinite(row[k]) for k in ("loss", "grad_norm", "reward/brightness/mean", "reward/colorfulness/mean")
        )
    # bf16 transformer: rollout and recompute run the same micro-batches here (2 and 2), so the
    # ratio is 1 up to bf16 kernel differences; a broken invariant is off by far more
    assert abs(rows[0]["ratio_first"] - 1) < 1e-3
    latest = RunDir(out).latest_checkpoint()
    assert latest is not None and latest.name == "step-000002" and (latest / LORA_FILE).is_file()


def _sd35m_step(model, inputs, lora_params, checkpointing: bool):
    """One forward + backward; returns (output, LoRA grads, peak GiB of this step)."""
    if checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.disable_gradient_checkpointing()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = model(**inputs, return_dict=False)[0]
    out.float().square().mean().backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out.detach(), [p.grad.detach().clone() for p in lora_params], peak


def test_sd35m_architecture_forward_backward_with_lora_and_checkpointing():
    from diffusers import SD3Transformer2DModel

    from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
    from apexcli.models.lora import attach_lora
    from bench_gpu import SD35M_TRANSFORMER

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = SD3Transformer2DModel(**SD35M_TRANSFORMER).to(torch.bfloat16)
    params = attach_lora(model, rank=32, alpha=64, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0)
    # r * (in + out) = 32 * (1536 + 1536) per projection; 8 projections in each of the 24 blocks,
    # except the last block, which has no to_add_out (its text stream ends there)
    assert sum(p.numel() for p in params) == 32 * 3072 * (24 * 8 - 1)
    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, 64, device="cuda", generator=g).bfloat16(),  # 512 px / 8
        timestep=torch.tensor([500.0], device="cuda"),
        encoder_hidden_states=torch.randn(1, 77 + 256, 4096, device="cuda", generator=g).bfloat16(),
        pooled_projections=torch.randn(1, 2048, device="cuda", generator=g).bfloat16(),
    )
    model.train()
    out_plain, grads_plain, peak_plain = _sd35m_step(model, inputs, params, checkpointing=False)
    out_ckpt, grads_ckpt, peak_ckpt = _sd35m_step(model, inputs, params, checkpointing=True)

    assert out_plain.shape == (1, 16, 64, 64) and torch.isfinite(out_plain).all()
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-2, atol=1e-2)  # checkpointing changes only the backward
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    last = SD35M_TRANSFORMER["num_layers"] - 1
    for name, gp, gc in zip(names, grads_plain, grads_ckpt):
        assert torch.isfinite(gp).all(), name
        # B = 0 at init, so dL/dA = B^T (...) = 0 exactly; and the last block's text queries feed
        # only the text output that block discards, so its add_q_proj gets no gradient at all
        if "lora_A" in name or name.startswith(f"transformer_blocks.{last}.attn.add_q_proj."):
            assert torch.count_nonzero(gp) == 0, name
        else:
            assert torch.count_nonzero(gp) > 0, name
            assert (gp - gc).norm() <= 1e-2 * gp.norm(), name
    assert peak_ckpt < 0.7 * peak_plain, (peak_ckpt, peak_plain)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_rollout_does_not_synchronize(family):
    """Each host-device sync stalls the CPU until the GPU drains. A training rollout (prompt
    embeddings and group-shared noise coming from the CPU, as in the trainer) makes none, on
    either family."""
    from apexcli.flow.rollout import PromptEmbeds, initial_noise, latent_channels, rollout
    from apexcli.models.tiny import build_tiny_pipeline
    from apexcli.models.tiny_flux import build_tiny_flux_pipeline
    from bench_gpu import count_syncs

    pipe = build_tiny_flux_pipeline() if family == "flux" else build_tiny_pipeline()
    transformer = pipe.transformer.to("cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    cond_on_cpu = PromptEmbeds(
        torch.randn(2, 8, transformer.config.joint_attention_dim),
        torch.randn(2, transformer.config.pooled_projection_dim),
    )

    def run():
        noise = initial_noise(
            2,
            (latent_channels(transformer), 16, 16),
            group_ids=[0, 0],
            share_within_group=True,
            seed=1,
            device="cuda",
        )
        return rollout(
            transformer,
            pipe.scheduler,
            cond_on_cpu.to("cuda"),
            num_steps=6,
            height=32,
            width=32,
            vae_scale_factor=pipe.vae_scale_factor,
            sampler="sde",
            initial_noise=noise,
            generator=gen,
        )

    run()  # warm-up: first-call allocations and kernel selection
    syncs = count_syncs(run, torch.device("cuda"))
    assert syncs == 0, f"{syncs} host syncs in a 6-step rollout"
