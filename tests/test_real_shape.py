"""Every SD3.5 preset end to end on real-shape fixtures (published widths, depth cut, random weights).

The fixtures (``apexcli.models.real_shape``) keep every width, head count, position-embedding
size, dual-attention layout, VAE, text-encoder width and tokenizer length of SD3.5-Medium and
-Large, and are saved in diffusers' layout and loaded through ``model.pretrained=DIR``, the
path of the released weights. The presets run as shipped except for what a CPU needs: 128 px,
4 rollout steps, one prompt of 4 samples per update, micro-batches of 2 (so each update still
makes its two optimizer steps), a short eval. The objectives are ``pick,aes,ocr`` with reward
towers at their real widths (PickScore's CLIP-H, the aesthetic CLIP-L + LAION MLP) and the real
OCR (the sizes, the towers and the run helper are shared with the FLUX.1-dev runs: ``helpers``
and ``conftest``); DeQA runs as its own server and has its own tests.

Minutes on two cores: marked slow (``make test-all``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apexcli.models import architectures as arch
from helpers import read_metrics, run_apex_subprocess, train_real_shape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd35m(tmp_path_factory) -> Path:
    from apexcli.models.real_shape import save_real_shape_sd3

    return save_real_shape_sd3(tmp_path_factory.mktemp("sd35m") / "pipe", "sd35m")


@pytest.fixture(scope="module")
def sd35l(tmp_path_factory) -> Path:
    from apexcli.models.real_shape import save_real_shape_sd3

    return save_real_shape_sd3(tmp_path_factory.mktemp("sd35l") / "pipe", "sd35l")


def test_the_fixture_loads_with_the_published_shapes(sd35m):
    from apexcli.config import ModelConfig
    from apexcli.models.loading import load_pipeline
    from apexcli.models.text_cache import encoder_fingerprint

    pipe = load_pipeline(ModelConfig(pretrained=str(sd35m), dtype="bfloat16"))
    t = pipe.transformer
    for key, value in arch.SD35M_TRANSFORMER.items():
        if key not in ("num_layers", "dual_attention_layers"):
            assert t.config[key] == value, key
    assert t.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
    assert t.transformer_blocks[0].attn2 is not None  # MMDiT-X dual attention kept
    assert t.transformer_blocks[-1].context_pre_only  # the last block has no text output, as released
    assert pipe.text_encoder.get_input_embeddings().weight.numel() > 2**24  # past float32's exact integers
    assert pipe.text_encoder_3.config.d_model == 4096 and pipe.text_encoder_3.config.d_ff == 10240
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_3.model_max_length == 512
    assert pipe.vae.config.latent_channels == 16 and pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == 1.5305 and pipe.vae.config.shift_factor == 0.0609
    assert len(encoder_fingerprint(pipe)) == 64  # hashes tables of 37.9 M, 63.2 M and 131.6 M elements


def test_sd35m_1gpu_runs_end_to_end_and_resumes(sd35m, towers, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "text_cache"
    err = train_real_shape("sd35m-1gpu", sd35m, out, towers, f"model.text_cache_dir={cache}")
    assert "apex: one process; 4 samples per update" in err
    rows = read_metrics(out)
    assert [r["optimizer_steps"] for r in rows] == [2, 2]  # the recipe's two steps per epoch
    assert all(r["ratio_first"] == 1.0 for r in rows)  # on-policy recompute equals the rollout, bf16 included
    second = rows[-1]
    assert second["grad_norm"] > 0 and second["kl"] > 0  # trained, against the LoRA-disabled reference
    assert second["clip_frac"] > 0 and second["ratio_max_dev"] > 1e-4  # the second step is off-policy: the clip acts
    assert any(cache.glob("*.safetensors"))  # prompts cached, encoders freed
    evals = read_metrics(out, "eval")
    assert [r["step"] for r in evals] == [0, 2] and (out / "eval" / "step-000002" / "grid.png").is_file()
    lora = load_file(str(out / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())
    assert (out / "checkpoints" / "step-000002" / "ema").is_dir()

    err = train_real_shape(
        "sd35m-1gpu", sd35m, out, towers, f"model.text_cache_dir={cache}", "train.steps=3", "--resume", "auto"
    )
    assert "resumed from" in err and "step 2" in err
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_a_stock_pipeline_loads_the_lora_trained_on_the_real_shapes(sd35m, towers, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    train_real_shape("sd35m-1gpu", sd35m, out, towers, "train.steps=1", "eval.every=0", "train.lr=1e-2")
    ckpt = out / "checkpoints" / "step-000001"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd35m), torch_dtype=torch.bfloat16)
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cond = dict(
        encoder_hidden_states=torch.randn(1, 8, 4096, dtype=torch.bfloat16),
        pooled_projections=torch.randn(1, 2048, dtype=torch.bfloat16),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad():
        base = pipe.transformer(hidden_states=x, **cond).sample
        pipe.load_lora_weights(str(ckpt), weight_name="pytorch_lora_weights.safetensors")
        tuned = pipe.transformer(hidden_states=x, **cond).sample
    assert (tuned.float() - base.float()).abs().max() > 0  # every LoRA key found its layer and changed it

    samples = tmp_path / "samples"
    result = run_apex_subprocess(
        [
            "sample",
            "--model",
            str(sd35m),
            "--lora",
            str(out),
            "--prompt",
            'a sign that says "HI"',
            "--size",
            "128",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(samples),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = [json.loads(line) for line in (samples / "metadata.jsonl").read_text().splitlines()]
    assert len(meta) == 1 and (samples / meta[0]["file"]).is_file()


@pytest.mark.parametrize("preset", ["sd35m", "sd35l"])
def test_many_gpu_presets_run_end_to_end(preset, request, towers, tmp_path):
    model = request.getfixturevalue("sd35l" if preset == "sd35l" else "sd35m")
    out = tmp_path / "run"
    train_real_shape(preset, model, out, towers)
    rows = read_metrics(out)
    assert [r["optimizer_steps"] for r in rows] == [2, 2] and all(r["ratio_first"] == 1.0 for r in rows)
    assert rows[-1]["grad_norm"] > 0
    assert [r["step"] for r in read_metrics(out, "eval")] == [0, 2]
    lora = load_file(str(out / "checkpoints" / "step-000002" / "pytorch_lora_weights.safetensors"))
    width = 2432 if preset == "sd35l" else 1536
    assert lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (32, width)
