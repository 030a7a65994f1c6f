"""FLUX.1 through the shared rollout, losses, LoRA and sampling, on the tiny-flux pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from apexcli.backbones import backbone_of, backbone_of_pipeline
from apexcli.conditioning import PromptEmbeds
from apexcli.config import ModelConfig
from apexcli.errors import ApexError
from apexcli.flow.rollout import latent_channels, predict_velocity, rollout
from apexcli.models.loading import load_pipeline
from apexcli.models.text_cache import encode_prompts
from apexcli.models.tiny_flux import build_tiny_flux_pipeline
from apexcli.runs import LORA_FILE
from helpers import TINY_OVERRIDES, load_lora_file, read_metrics, run_cli

SEQ = 32  # the tiny preset's model.max_sequence_length


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def cond(pipe):
    return encode_prompts(pipe, ["a red apple", "a blue sky"], max_sequence_length=SEQ, device="cpu")


def _train(out, steps: int, resume: str | None = None):
    argv = [
        "train",
        "--preset",
        "tiny-flux",
        "--steps",
        str(steps),
        "--out",
        str(out),
        *TINY_OVERRIDES,
        "train.checkpoint_every=1",
    ]
    if resume:
        argv += ["--resume", resume]
    result = run_cli(argv)
    assert result.code == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-step tiny-flux run straight, and one of 2 steps resumed to 3."""
    root = tmp_path_factory.mktemp("flux")
    straight = _train(root / "straight", 3)
    resumed = _train(root / "resumed", 2)
    _train(resumed, 3, resume="auto")
    return straight, resumed


def test_family_is_read_off_the_pipeline_and_transformer(pipe):
    assert backbone_of_pipeline(pipe).family == "flux" and backbone_of(pipe.transformer).family == "flux"
    assert latent_channels(pipe.transformer) == 16


def test_velocity_is_the_stock_transformer_call_on_packed_tokens(pipe, cond):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    v = predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.5)
    packed = FluxPipeline._pack_latents(x, 2, 16, 8, 8)
    out = pipe.transformer(
        hidden_states=packed,
        timestep=torch.full((2,), 0.7),
        guidance=torch.full((2,), 3.5),
        pooled_projections=cond.pooled,
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
        return_dict=False,
    )[0]
    side = 8 * pipe.vae_scale_factor
    expected = FluxPipeline._unpack_latents(out, side, side, pipe.vae_scale_factor)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # the distilled guidance is an input: another value, another velocity, from one forward
    assert not torch.allclose(v, predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=1.0))


def test_rollout_is_deterministic(pipe, cond):
    def run(seed: int):
        return rollout(
            pipe.transformer,
            pipe.scheduler,
            cond,
            num_steps=3,
            height=32,
            width=32,
            vae_scale_factor=pipe.vae_scale_factor,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(seed),
        )

    a, b, c = run(1), run(1), run(2)
    assert a.latents.shape == (2, 4, 16, 16, 16)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents, c.latents)
    assert float(a.sigmas[0]) == 1.0 and float(a.sigmas[-1]) == 0.0


def test_on_policy_ratio_is_one(runs):
    straight, _ = runs
    rows = read_metrics(straight)
    assert len(rows) == 3 and all(row["ratio_first"] == 1.0 for row in rows)


def test_resume_is_bit_for_bit(runs):
    straight, resumed = runs
    a = load_lora_file(straight / "checkpoints" / "step-000003")
    b = load_lora_file(resumed / "checkpoints" / "step-000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("single_transformer_blocks" in k for k in a)  # the single-stream attention is trained too


def test_saved_lora_loads_into_a_stock_flux_pipeline(runs, pipe, cond):
    straight, _ = runs
    stock = build_tiny_flux_pipeline(seed=0)
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    before = predict_velocity(stock.transformer, x, 0.5, cond[0], guidance_scale=3.5)
    stock.load_lora_weights(str(straight / "checkpoints" / "step-000003"), weight_name=LORA_FILE)
    after = predict_velocity(stock.transformer, x, 0.5, cond[0], guidance_scale=3.5)
    assert not torch.allclose(before, after)


def test_apex_sample_reproduces_the_stock_pipeline(runs, tmp_path):
    straight, _ = runs
    out = tmp_path / "samples"
    result = run_cli(
        [
            "sample",
            "--preset",
            "tiny-flux",
            "--lora",
            str(straight),
            "--prompt",
            "a red apple",
            "--steps",
            "4",
            "--size",
            "32",
            "--seed",
            "5",
            "--out",
            str(out),
        ]
    )
    assert result.code == 0, result.stderr[-3000:]
    ours = np.asarray(Image.open(out / json.loads((out / "metadata.jsonl").read_text().splitlines()[0])["file"]))
    stock = build_tiny_flux_pipeline(seed=0)
    stock.load_lora_weights(str(straight / "checkpoints" / "step-000003"), weight_name=LORA_FILE)
    f = stock.vae_scale_factor
    noise = torch.randn((16, 32 // f, 32 // f), generator=torch.Generator().manual_seed(5))[None]
    image = stock(
        "a red apple",
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=3.5,
        max_sequence_length=SEQ,
        latents=FluxPipeline._pack_latents(noise, 1, 16, 32 // f, 32 // f),
        output_type="np",
    ).images[0]
    theirs = (image * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_a_saved_flux_directory_loads_as_flux(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "flux"))
    loaded = load_pipeline(ModelConfig(pretrained=str(tmp_path / "flux"), dtype="float32", local_files_only=True))
    assert isinstance(loaded, FluxPipeline)
    a, b = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_unsupported_pipeline_class_is_a_one_line_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ApexError, match="StableDiffusionXLPipeline") as info:
        load_pipeline(ModelConfig(pretrained=str(tmp_path), dtype="float32", local_files_only=True))
    assert "\n" not in str(info.value) and "FluxPipeline" in str(info.value)


def test_the_memory_plan_of_a_flux_transformer_is_a_plan_or_one_line():
    """``plan_memory`` given FLUX.1-dev's transformer config (what the GPU check's trainer part
    passes) plans it or refuses in one line; read as SD3, it failed deep inside a forward pass."""
    from apexcli.config import resolve_config
    from apexcli.models.architectures import FLUX1_DEV_TRANSFORMER
    from apexcli.models.memory_plan import plan_memory

    cfg = resolve_config(preset="flux1-dev-1gpu")
    try:
        plan = plan_memory(cfg, transformer=dict(FLUX1_DEV_TRANSFORMER))
    except ApexError as exc:
        assert "\n" not in str(exc) and "FLUX" in str(exc)
    else:
        assert plan.peak() > 11.9e9 * 2  # the bf16 transformer alone


class _HostToDeviceCopies(TorchDispatchMode):
    """Records every op that takes a CPU tensor and returns a tensor on another device."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        host = [a for a in args if isinstance(a, torch.Tensor) and a.device.type == "cpu"]
        outs = out if isinstance(out, (tuple, list)) else [out]
        if host and any(isinstance(o, torch.Tensor) and o.device.type != "cpu" for o in outs):
            self.copies.append(f"{func} of {[tuple(t.shape) for t in host]}")
        return out


def test_a_velocity_call_copies_nothing_from_the_host():
    """On a GPU each host-to-device copy is a sync; the rollout keeps its sigmas on the device for
    that reason. With every input on the device (the meta device stands in), the FLUX velocity
    call builds its position ids, text ids and guidance there too, as the SD3 call does."""
    transformer = build_tiny_flux_pipeline(seed=0).transformer.to("meta")
    cond = PromptEmbeds(torch.empty(2, 8, 32, device="meta"), torch.empty(2, 32, device="meta"))
    x = torch.empty(2, 16, 8, 8, device="meta")
    with _HostToDeviceCopies() as seen:
        v = predict_velocity(transformer, x, torch.empty((), device="meta"), cond, guidance_scale=3.5)
    assert v.shape == x.shape and v.device.type == "meta"
    assert seen.copies == []
