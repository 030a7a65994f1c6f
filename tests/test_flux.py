"""FLUX.1 through the shared rollout, losses, LoRA and sampling, on the tiny-flux pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
from apexcli.soup import delta_weights, read_lora
from helpers import TINY_OVERRIDES, copy_run, error_line, load_lora_file, read_metrics, run_cli

SEQ = 32  # the tiny preset's model.max_sequence_length


@pytest.fixture(scope="module")
def pipe() -> FluxPipeline:
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def cond(pipe):
    return encode_prompts(pipe, ["a red apple", "a blue sky"], max_sequence_length=SEQ, device="cpu")


def _train(out, steps: int, resume: str | None = None, extra: tuple[str, ...] = ()):
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
        *extra,
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


def _apex_sample(out: Path, *options: str) -> tuple[np.ndarray, dict]:
    """``apex sample`` of "a red apple", 4 steps, 32 px, seed 5 on tiny-flux: the image and its metadata row."""
    argv = ["sample", "--preset", "tiny-flux", "--prompt", "a red apple", "--steps", "4", "--size", "32"]
    result = run_cli([*argv, "--seed", "5", "--out", str(out), *options])
    assert result.code == 0, result.stderr[-3000:]
    row = json.loads((out / "metadata.jsonl").read_text().splitlines()[0])
    return np.asarray(Image.open(out / row["file"])), row


def _stock_sample(stock: FluxPipeline, **kwargs) -> np.ndarray:
    """The stock pipeline's image of ``_apex_sample``'s prompt, size, steps and seed-5 noise."""
    f = stock.vae_scale_factor
    noise = torch.randn((16, 32 // f, 32 // f), generator=torch.Generator().manual_seed(5))[None]
    image = stock(
        "a red apple",
        height=32,
        width=32,
        num_inference_steps=4,
        max_sequence_length=SEQ,
        latents=FluxPipeline._pack_latents(noise, 1, 16, 32 // f, 32 // f),
        output_type="np",
        **kwargs,
    ).images[0]
    return (image * 255).round().astype(np.uint8)


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_apex_sample_reproduces_the_stock_pipeline(runs, tmp_path):
    straight, _ = runs
    ours, _ = _apex_sample(tmp_path / "samples", "--lora", str(straight))
    stock = build_tiny_flux_pipeline(seed=0)
    stock.load_lora_weights(str(straight / "checkpoints" / "step-000003"), weight_name=LORA_FILE)
    assert _max_diff(ours, _stock_sample(stock, guidance_scale=3.5)) <= 1


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


# --------------------------------------------------------------------------- true CFG

NEGATIVE = "a dark blurry photo"


@pytest.fixture(scope="module")
def true_cfg_run(tmp_path_factory):
    """A 2-step tiny-flux run with true CFG 2 against the empty negative prompt (the eval setup of
    ``runs``: it can be mixed with them)."""
    return _train(tmp_path_factory.mktemp("flux-true-cfg") / "run", 2, extra=("sampling.true_cfg_scale=2.0",))


def test_true_cfg_is_the_negative_and_conditional_forwards_combined(pipe, cond):
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    neg = encode_prompts(pipe, [NEGATIVE], max_sequence_length=SEQ, device="cpu")
    v = predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.5, uncond=neg, true_cfg_scale=2.0)
    # diffusers' two calls, each with the distilled guidance: one forward batched over [neg, cond] equals them
    v_cond = predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.5)
    v_neg = predict_velocity(pipe.transformer, x, 0.7, neg.expand(2), guidance_scale=3.5)
    torch.testing.assert_close(v, v_neg + 2.0 * (v_cond - v_neg), rtol=0, atol=1e-6)
    assert not torch.allclose(v, v_cond)
    with pytest.raises(ValueError, match="uncond"):
        predict_velocity(pipe.transformer, x, 0.7, cond, guidance_scale=3.5, true_cfg_scale=2.0)


def test_apex_sample_with_true_cfg_reproduces_the_stock_pipeline(tmp_path):
    ours, row = _apex_sample(tmp_path / "samples", "--true-cfg", "2", f"sampling.negative_prompt={NEGATIVE}")
    assert row["true_cfg"] == 2.0 and row["guidance"] == 3.5
    stock = build_tiny_flux_pipeline(seed=0)
    theirs = _stock_sample(stock, guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt=NEGATIVE)
    assert _max_diff(ours, theirs) <= 1
    assert _max_diff(ours, _stock_sample(stock, guidance_scale=3.5)) > 1  # true CFG changed the image


def test_on_policy_ratio_is_one_with_true_cfg(true_cfg_run, runs):
    rows = read_metrics(true_cfg_run)
    assert len(rows) == 2 and all(row["ratio_first"] == 1.0 for row in rows)
    # the rollouts took the true-CFG velocity: the update differs from the run without it
    straight, _ = runs
    a = load_lora_file(true_cfg_run / "checkpoints" / "step-000002")
    b = load_lora_file(straight / "checkpoints" / "step-000002")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["train", "--preset", "tiny", "--steps", "1", *TINY_OVERRIDES, "sampling.true_cfg_scale=2"], "sampling."),
        (["train", "--preset", "tiny", "--steps", "1", *TINY_OVERRIDES, "eval.true_cfg_scale=1.5"], "eval."),
        (["sample", "--preset", "tiny", "--prompt", "a cat", "--size", "32", "--steps", "2", "--true-cfg", "2"], "--"),
    ],
)
def test_sd3_refuses_true_cfg_at_set_up(argv, key, tmp_path):
    line = error_line(run_cli([*argv, "--out", str(tmp_path / "out")]))
    assert "SD3's guidance_scale is already true CFG" in line
    if key == "--":
        assert "--true-cfg=2 " in line and "--guidance" in line
    else:
        assert f"{key}true_cfg_scale=" in line and f"raise {key}guidance_scale" in line


# --------------------------------------------------------------------------- FLUX.1-schnell


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("schnell") / "tiny-flux-schnell"
    build_tiny_flux_pipeline(seed=0, schnell=True).save_pretrained(str(path))
    return path


def _schnell_options(schnell_dir: Path) -> tuple[str, ...]:
    return (f"model.pretrained={schnell_dir}", "model.local_files_only=true")


@pytest.fixture(scope="module")
def schnell_run(schnell_dir, tmp_path_factory):
    """A 2-step run of the saved schnell pipeline (the tiny-flux preset's guidance 3.5 is ignored)."""
    return _train(tmp_path_factory.mktemp("flux-schnell") / "run", 2, extra=_schnell_options(schnell_dir))


def _load_schnell(schnell_dir: Path) -> FluxPipeline:
    return load_pipeline(ModelConfig(pretrained=str(schnell_dir), dtype="float32", local_files_only=True))


def test_a_saved_schnell_pipeline_loads_as_flux_without_guidance(schnell_dir):
    pipe = _load_schnell(schnell_dir)
    assert isinstance(pipe, FluxPipeline) and backbone_of_pipeline(pipe).family == "flux"
    assert backbone_of(pipe.transformer).family == "flux" and not pipe.transformer.config.guidance_embeds
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0


def test_schnell_sigmas_are_the_stock_pipelines(schnell_dir, pipe):
    schnell = _load_schnell(schnell_dir)
    cond = encode_prompts(schnell, ["a red apple"], max_sequence_length=SEQ, device="cpu")
    common = dict(num_steps=4, height=32, width=32, vae_scale_factor=schnell.vae_scale_factor, sampler="ode")
    ours = rollout(schnell.transformer, schnell.scheduler, cond, **common).sigmas
    schnell("a red apple", height=32, width=32, num_inference_steps=4, max_sequence_length=SEQ, output_type="latent")
    assert torch.equal(ours, schnell.scheduler.sigmas.float())
    # schnell's schedule is the plain linspace: the token count's shift mu must not move it
    torch.testing.assert_close(ours, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]), rtol=0, atol=1e-7)
    dev_cond = encode_prompts(pipe, ["a red apple"], max_sequence_length=SEQ, device="cpu")
    assert not torch.allclose(rollout(pipe.transformer, pipe.scheduler, dev_cond, **common).sigmas, ours)


def test_schnell_on_policy_ratio_is_one(schnell_run):
    rows = read_metrics(schnell_run)
    assert len(rows) == 2 and all(row["ratio_first"] == 1.0 for row in rows)


def test_apex_sample_reproduces_the_stock_schnell_pipeline(schnell_dir, schnell_run, tmp_path):
    options = ("--lora", str(schnell_run), *_schnell_options(schnell_dir))
    ours, row = _apex_sample(tmp_path / "samples", *options)
    assert row["guidance"] == 3.5  # the preset's, which schnell ignores: the stock call below passes 0
    stock = FluxPipeline.from_pretrained(str(schnell_dir))
    stock.load_lora_weights(str(schnell_run / "checkpoints" / "step-000002"), weight_name=LORA_FILE)
    assert _max_diff(ours, _stock_sample(stock, guidance_scale=0.0)) <= 1


# --------------------------------------------------------------------------- eval, soup, pareto


def _eval_row(run: Path, step: int) -> dict:
    return [r for r in read_metrics(run, "eval") if r["step"] == step][-1]


def test_eval_soup_and_pareto_on_tiny_flux_runs(runs, true_cfg_run, tmp_path):
    straight, _ = runs
    a, b = copy_run(straight, tmp_path / "a"), copy_run(true_cfg_run, tmp_path / "b")
    # apex eval: the base model and the run's LoRA, each a row of finite rewards in metrics.jsonl
    for checkpoint in (["--checkpoint", "base"], []):
        result = run_cli(["eval", str(a), *checkpoint, "--log"])
        assert result.code == 0, result.stderr[-3000:]
    base, tuned = _eval_row(a, 0), _eval_row(a, 3)
    means = [k for k in tuned if k.startswith("eval/") and k.endswith("/mean")]
    assert len(means) == 2 and all(math.isfinite(tuned[k]) and math.isfinite(base[k]) for k in means)
    assert any(tuned[k] != base[k] for k in means)  # the LoRA was applied
    scores = [json.loads(line) for line in (a / "eval" / "step-000003" / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 4 and all(math.isfinite(s["brightness"]) for s in scores)

    # apex soup: the mixture's weight change is the weighted mean of the parents'
    soups = tmp_path / "soups"
    result = run_cli(["soup", str(a), str(b), "--coef", "0.25,0.75", "--out", str(soups)])
    assert result.code == 0, result.stderr[-3000:]
    soup = soups / "soup-0.25-0.75"
    mixed = delta_weights(read_lora(soup / "checkpoints" / "step-000003"))
    da = delta_weights(read_lora(a / "checkpoints" / "step-000003"))
    db = delta_weights(read_lora(b / "checkpoints" / "step-000002"))
    assert mixed.keys() == da.keys() == db.keys()
    for module, delta in mixed.items():
        # float32 factors (the mixture's B is c * B_i in float32), products in float64
        torch.testing.assert_close(delta, 0.25 * da[module] + 0.75 * db[module], rtol=0, atol=1e-8)
    # ... and a stock FluxPipeline loading it runs the base weights plus that mean
    stock, expected = build_tiny_flux_pipeline(seed=0), build_tiny_flux_pipeline(seed=0)
    stock.load_lora_weights(str(soup / "checkpoints" / "step-000003"), weight_name=LORA_FILE)
    modules = dict(expected.transformer.named_modules())
    with torch.no_grad():
        for module, delta in mixed.items():
            modules[module.removeprefix("transformer.")].weight += delta.float()
    cond = encode_prompts(stock, ["a red apple"], max_sequence_length=SEQ, device="cpu")
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    v_stock = predict_velocity(stock.transformer, x, 0.5, cond, guidance_scale=3.5)
    v_expected = predict_velocity(expected.transformer, x, 0.5, cond, guidance_scale=3.5)
    torch.testing.assert_close(v_stock, v_expected, rtol=0, atol=1e-5)
    mixture = _eval_row(soup, 3)
    assert all(math.isfinite(mixture[k]) for k in means) and _eval_row(soup, 0) == base

    # apex pareto: both runs listed, each at its final eval
    result = run_cli(["pareto", str(a), str(soups), "--out", str(tmp_path / "pareto")])
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "pareto" / "pareto.json").read_text())
    listed = {Path(r["path"]).resolve(): r for r in report["runs"]}
    assert listed.keys() == {a.resolve(), soup.resolve()}
    for run, row in ((a, tuned), (soup, mixture)):
        (point,) = listed[run.resolve()]["points"]
        assert point["step"] == 3
        assert point["values"] == {k.split("/")[1]: row[k] for k in means}


def test_the_memory_plan_reads_a_flux_transformer_config():
    """``plan_memory`` given FLUX.1-dev's transformer config (what the GPU check's trainer part
    passes) plans it as FLUX; read as SD3, it failed deep inside a forward pass."""
    from apexcli.config import resolve_config
    from apexcli.models.architectures import FLUX1_DEV_TRANSFORMER
    from apexcli.models.memory_plan import plan_memory

    plan = plan_memory(resolve_config(preset="flux1-dev-1gpu"), transformer=dict(FLUX1_DEV_TRANSFORMER))
    assert plan.row("transformer").nbytes == 2 * 11_901_408_320 and plan.step.shape.family == "flux"


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
