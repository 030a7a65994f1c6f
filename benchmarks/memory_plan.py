"""The sd35m-1gpu memory plan, COMPUTED from the public architecture configs (no weights, no GPU).

    python benchmarks/memory_plan.py            # table + one JSON line (docs/memory.md quotes it)

Every module is built on the meta device from its public config, so parameter counts are
exact. Activation memory of one training micro-batch (twice its samples with CFG: the forward runs
[uncond, cond]) is the sum of the tensors autograd saves
for the backward pass (``torch.autograd.graph.saved_tensors_hooks`` on a meta forward), split
per transformer block, which gives the gradient-checkpointing figure too:

    no checkpointing:  saved(all)
    checkpointing:     saved(outside blocks) + sum_b inputs(b) + max_b saved(b)    (one block recomputed)

The meta forward runs SDPA's math path, which saves the [B, heads, L, L] attention scores; the
flash / cuDNN kernels used on a GPU save only a log-sum-exp, so the scores are reported apart
and left out of the totals. Saved-tensor sums count a tensor saved by two ops twice and views
separately, so they are an upper bound; ``bench_gpu.py`` measures the real peaks (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import CLIP_H_PROJECTION, CLIP_H_TEXT, CLIP_H_VISION, CLIP_L_VISION, SD3_VAE, SD35M_TRANSFORMER  # noqa: E402
from mfu import meta_transformer, quiet_diffusers  # noqa: E402

GB = 1e9
BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}

from apexcli.models.architectures import CLIP_G_TEXT, CLIP_L_TEXT, T5_XXL  # noqa: E402

DEQA_PARAMS_PUBLISHED = 8.2e9  # mPLUG-Owl2 (LLaMA-2-7B + ViT-L/14 + abstractor), its paper; remote code, not built here


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_params() -> dict[str, int]:
    from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTextConfig, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection, T5Config, T5EncoderModel

    vae = _meta_vae()
    with quiet_diffusers(), torch.device("meta"):
        out = {
            "transformer": n_params(meta_transformer(SD35M_TRANSFORMER, torch.bfloat16)),
            "vae": n_params(vae),
            "vae_decoder": n_params(vae.decoder),
            "clip_l_text": n_params(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT))),
            "clip_g_text": n_params(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT))),
            "t5_xxl_encoder": n_params(T5EncoderModel(T5Config(**T5_XXL))),
            "pick_clip_h": n_params(CLIPModel(CLIPConfig(text_config=dict(CLIP_H_TEXT), vision_config=dict(CLIP_H_VISION),
                                                         projection_dim=CLIP_H_PROJECTION))),
            "aes_clip_l_vision": n_params(CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L_VISION))),
        }
    out["aes_mlp"] = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
    return out


def lora_params(rank: int, alpha: int, targets: list[str], transformer_config: dict = SD35M_TRANSFORMER) -> int:
    model = meta_transformer(transformer_config, torch.bfloat16,
                             dict(rank=rank, alpha=alpha, dropout=0.0, target_modules=targets, seed=0))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_activation_bytes(batch: int, text_tokens: int, latent_hw: int, rank: int, targets: list[str],
                           transformer_config: dict = SD35M_TRANSFORMER, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes autograd saves for one forward of the policy (``dtype`` base, fp32 LoRA) on ``batch``."""
    model = meta_transformer(transformer_config, dtype, dict(rank=rank, alpha=2 * rank, dropout=0.0,
                                                            target_modules=targets, seed=0))
    per_block: dict[int, int] = {}
    block_inputs = 0
    current = [-1]

    def pre(idx):
        def hook(_module, args, kwargs):
            nonlocal block_inputs
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            block_inputs += sum(t.numel() * t.element_size() for t in tensors)
            current[0] = idx
        return hook

    def post(_module, _args, _out):
        current[0] = -1

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(pre(i), with_kwargs=True)
        block.register_forward_hook(post)

    scores = [0]

    def pack(t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if t.dim() == 4 and t.shape[-1] == t.shape[-2] and t.shape[-1] >= latent_hw * latent_hw // 4:
            scores[0] += nbytes  # [B, heads, L, L] attention scores: math SDPA keeps them, flash/cuDNN do not
            return t
        per_block[current[0]] = per_block.get(current[0], 0) + nbytes
        return t

    x = torch.empty(batch, 16, latent_hw, latent_hw, device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(hidden_states=x, timestep=torch.empty(batch, device="meta"),
              encoder_hidden_states=torch.empty(batch, text_tokens, 4096, device="meta", dtype=dtype),
              pooled_projections=torch.empty(batch, 2048, device="meta", dtype=dtype), return_dict=False)
    outside = per_block.pop(-1, 0)
    total = outside + sum(per_block.values())
    return {
        "math_attention_scores": scores[0],
        "no_ckpt": total,
        "ckpt": outside + block_inputs + max(per_block.values()),
        "outside_blocks": outside,
        "max_block": max(per_block.values()),
        "block_inputs": block_inputs,
    }


def lora_state_bytes(cfg, lora: int) -> dict[str, int]:
    """The fp32 LoRA weights, their gradients, AdamW's two moments and the EMA copy (when on)."""
    return {
        "lora_weights_fp32": lora * 4,
        "lora_grads_fp32": lora * 4,
        "adamw_states_fp32": lora * 8,
        "lora_ema_fp32": lora * 4 if cfg.train.ema_decay > 0 else 0,
    }


def trajectory_bytes(cfg) -> int:
    """One step's trajectories, kept for the update: [samples, T+1, 16, h, w] float32."""
    latent = cfg.model.resolution // 8
    return cfg.train.prompts_per_step * cfg.train.group_size * (cfg.sampling.num_steps + 1) * 16 * latent * latent * 4


def trainer_plan(cfg, transformer_config: dict = SD35M_TRANSFORMER) -> dict[str, int]:
    """Bytes the trainer keeps on its device with the rewards elsewhere (toy rewards, or a reward
    server) and the text encoders freed, as ``bench_train.py --arch sd35m`` runs it: the plan its
    measured peak is read against. The transformer counts its buffers too (the 384 x 384
    position table); rollout and VAE-decode working sets are transient and not in it."""
    from apexcli.config import SD3_JOINT_ATTENTION_PROJECTIONS
    from apexcli.models.loading import DTYPES

    dtype = DTYPES[cfg.model.dtype]
    targets = cfg.lora.target_modules or SD3_JOINT_ATTENTION_PROJECTIONS
    with quiet_diffusers():
        model = meta_transformer(transformer_config, dtype)
        vae = n_params(_meta_vae())
    weights = sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    forward_batch = cfg.train.train_batch_size * (2 if cfg.sampling.guidance_scale > 1 else 1)
    act = saved_activation_bytes(forward_batch, 77 + cfg.model.max_sequence_length, cfg.model.resolution // 8,
                                 cfg.lora.rank, targets, transformer_config, dtype)
    lora = lora_params(cfg.lora.rank, cfg.lora.alpha, targets, transformer_config)
    rows = {
        "transformer": weights * BYTES[dtype],
        "vae": vae * BYTES[dtype],
        **lora_state_bytes(cfg, lora),
        "activations_train": act["ckpt"] if cfg.model.gradient_checkpointing else act["no_ckpt"],
        "trajectories_fp32": trajectory_bytes(cfg),
    }
    return {**rows, "total": sum(rows.values())}


def _meta_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(SD3_VAE))


def main() -> None:
    from apexcli.config import SD3_JOINT_ATTENTION_PROJECTIONS, resolve_config
    from apexcli.rewards.base import resolve_dtype

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd35m-1gpu")
    args = parser.parse_args()
    cfg = resolve_config(preset=args.preset)
    text_tokens = 77 + cfg.model.max_sequence_length
    latent = cfg.model.resolution // 8
    params = component_params()
    lora = lora_params(cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules or SD3_JOINT_ATTENTION_PROJECTIONS)
    # with CFG every training forward runs the batch [uncond, cond]: twice the micro-batch
    cfg_factor = 2 if cfg.sampling.guidance_scale > 1 else 1
    forward_batch = cfg.train.train_batch_size * cfg_factor
    act = saved_activation_bytes(forward_batch, text_tokens, latent, cfg.lora.rank, cfg.lora.target_modules)
    bf16 = 2
    DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    pick_dt, aes_dt = (str(resolve_dtype(d, torch.float32)).removeprefix("torch.")
                       for d in (cfg.rewards.pick.dtype, cfg.rewards.aes.dtype))
    rows = {
        "transformer_bf16": params["transformer"] * bf16,
        "vae_bf16": params["vae"] * bf16,
        "text_encoders_bf16_freed": (params["clip_l_text"] + params["clip_g_text"] + params["t5_xxl_encoder"]) * bf16,
        "t5_xxl_bf16": params["t5_xxl_encoder"] * bf16,
        # the trainer loads the reward towers in float32 (as the reference) unless rewards.X.dtype says otherwise
        f"pick_clip_h_{pick_dt}": params["pick_clip_h"] * BYTES[DTYPES[pick_dt]],
        f"aes_clip_l_{aes_dt}": params["aes_clip_l_vision"] * BYTES[DTYPES[aes_dt]] + params["aes_mlp"] * 4,
        "deqa_fp16_published": int(DEQA_PARAMS_PUBLISHED * 2),  # float16: its score() casts to half
        **lora_state_bytes(cfg, lora),
        "activations_train_no_ckpt": act["no_ckpt"],
        "activations_train_ckpt": act["ckpt"],
        "trajectories_fp32": trajectory_bytes(cfg),
    }
    print(f"{'component':<30} {'GB':>8}")
    for k, v in rows.items():
        print(f"{k:<30} {v / GB:8.3f}")
    print(json.dumps({"preset": args.preset, "params": params, "lora_params": lora, "activations": act,
                      "bytes": rows, "train_batch": cfg.train.train_batch_size, "train_forward_batch": forward_batch,
                      "guidance_scale": cfg.sampling.guidance_scale, "text_tokens": text_tokens}))


if __name__ == "__main__":
    main()
