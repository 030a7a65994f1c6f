"""The memory plan (``models/memory_plan.py``): exact counts, what moves the activations, and a real
CPU measurement that the meta-device computation has to reproduce; for SD3.5 and FLUX.1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.config import resolve_config
from apexcli.errors import ApexError
from apexcli.models import architectures as arch
from apexcli.models import memory_families as mfam
from apexcli.models import memory_plan as mp
from apexcli.models.architectures import SD35M_TRANSFORMER

SMALL = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=32,
    out_channels=4,
    pos_embed_max_size=16,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),
)
"""MMDiT-X at small widths: a dual-attention block, a plain one and a last one without text output."""
SMALL_LORA = dict(rank=4, alpha=8, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0)
SD35M_CUT = dict(SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0,))
SD35M_LORA = dict(rank=32, alpha=64, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0)


@pytest.fixture(scope="module")
def plan() -> mp.MemoryPlan:
    return mp.plan_memory(resolve_config(preset="sd35m-1gpu"), gpu_bytes=80 * 10**9)


def test_lora_count_is_rank_times_in_plus_out_per_projection(plan):
    # 24 blocks x 8 projections, less the last block's to_add_out (it has no text output)
    assert plan.row("lora_weights").detail.startswith(f"{32 * 3072 * 191:,} parameters")
    assert plan.row("lora_weights").nbytes == 4 * 18_776_064
    assert plan.row("adamw_states").nbytes == 8 * 18_776_064


def test_pos_embed_buffer_is_resident_in_the_model_dtype(plan):
    pos_embed = plan.row("pos_embed")
    assert (pos_embed.nbytes, pos_embed.where) == (384 * 384 * 1536 * 2, "gpu")
    weights = plan.row("transformer").nbytes + pos_embed.nbytes + plan.row("vae").nbytes
    assert plan.row("host_weights").nbytes == weights + plan.row("text_encoders").nbytes


def test_the_plan_holds_the_preset_step_and_the_verdict_follows_the_gpu_size(plan):
    assert plan.step.checkpointing and plan.step.shape.forward_batch == 8
    assert plan.row("train_step").nbytes == plan.step.peak
    assert plan.fits(deqa_on_gpu=True)
    assert not dataclasses.replace(plan, gpu_bytes=plan.peak(deqa_on_gpu=True) - 1).fits(deqa_on_gpu=True)
    assert dataclasses.replace(plan, gpu_bytes=None).fits() is None


def test_reward_towers_count_once_and_not_when_served_elsewhere():
    params = mp.component_params()
    evaluated_too = resolve_config(preset="sd35m-1gpu", overrides=["eval.objectives=[pick,aes,ocr]"])
    assert [r.key for r in mp.reward_rows(evaluated_too, params)] == ["pick", "aes", "deqa"]
    remote = resolve_config(preset="sd35m-1gpu", overrides=["objectives=[pick@http://127.0.0.1:1,aes,ocr]"])
    assert [r.key for r in mp.reward_rows(remote, params)] == ["aes"]
    half = resolve_config(preset="sd35m-1gpu", overrides=["rewards.pick.dtype=bfloat16"])
    pick = {r.key: r.nbytes for r in mp.reward_rows(half, params)}["pick"]
    assert pick == 2 * params["pick_clip_h"]


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block_at_a_time():
    shape = mp.StepShape(1, 16, 77 + 16, 4.5)
    off = mp.compute_step_memory(SD35M_CUT, shape, SD35M_LORA, checkpointing=False)
    on = mp.compute_step_memory(SD35M_CUT, shape, SD35M_LORA, checkpointing=True)
    assert on.kept < off.kept / 5
    assert on.peak < off.peak
    # a recomputed block's backward holds more than the tensors the block saves: its gradients too
    assert all(w > s for w, s in zip(on.block_working_set, off.block_saved, strict=True))
    assert on.peak >= on.kept + on.block_working_set[-1]


def test_cfg_doubles_the_forward_batch_and_the_activations():
    guided, plain = mp.StepShape(2, 16, 93, 4.5), mp.StepShape(2, 16, 93, 1.0)
    assert (guided.forward_batch, plain.forward_batch) == (4, 2)
    with_cfg = mp.compute_step_memory(SD35M_CUT, guided, SD35M_LORA, checkpointing=False)
    without = mp.compute_step_memory(SD35M_CUT, plain, SD35M_LORA, checkpointing=False)
    assert sum(with_cfg.block_saved) / sum(without.block_saved) == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_computation_matches_a_real_cpu_step(checkpointing):
    shape = mp.StepShape(2, 16, 24, 4.5)
    computed = mp.compute_step_memory(SMALL, shape, SMALL_LORA, checkpointing=checkpointing)
    model = mp.sd3_transformer(SMALL, torch.bfloat16, "cpu", SMALL_LORA)
    mp.allocate_lora_grads(model)
    inputs = mp.step_inputs(SMALL, shape, "cpu")
    box: dict = {}
    allocator = mp.cpu_allocator_peak(
        lambda: box.setdefault("step", mp.step_memory(model, inputs, shape, checkpointing=checkpointing))
    )
    measured = box["step"]
    assert measured.peak == pytest.approx(computed.peak, rel=0.01)
    assert allocator == pytest.approx(computed.peak, rel=0.10)  # the allocator adds kernel workspaces
    pairs = (
        zip(measured.block_working_set, computed.block_working_set, strict=True)
        if checkpointing
        else zip(measured.block_saved_by_data_ptr, computed.block_saved, strict=True)
    )
    pairs = list(pairs)
    assert len(pairs) == SMALL["num_layers"]
    for real, meta in pairs:
        assert real == pytest.approx(meta, rel=0.01)


def test_live_bytes_follow_allocations_and_frees():
    live = mp.LiveBytes()
    with live:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # a view: no new storage
        b = a * 2  # 8000 live
        a.mul_(3)  # in place: no new storage
        del a, b
        c = view + 1  # a lives on through its view: 4000 + 40
    assert (live.peak, live.now) == (8000, 4040)
    del view
    assert live.now == 40
    del c
    assert live.now == 0


# --------------------------------------------------------------------------- FLUX.1

FLUX_SMALL = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
"""FLUX.1 at small widths: one double-stream block and two single-stream ones, guidance embedding."""
FLUX_LORA = dict(rank=4, alpha=8, dropout=0.0, target_modules=JOINT_ATTENTION_PROJECTIONS, seed=0)


def flux_config(preset: str = "flux1-dev-1gpu", overrides: tuple[str, ...] = (), true_cfg: float | None = None):
    cfg = resolve_config(preset=preset, overrides=list(overrides))
    if true_cfg is not None:  # the plan reads sampling.true_cfg_scale with getattr: set where the config lacks it
        cfg.sampling.true_cfg_scale = true_cfg
    return cfg


@pytest.fixture(scope="module")
def flux_plan() -> mp.MemoryPlan:
    return mp.plan_memory(flux_config(), gpu_bytes=80 * 10**9)


def test_meta_flux_transformers_have_the_published_parameter_counts():
    dev = mp.build_transformer(dict(arch.FLUX1_DEV_TRANSFORMER), torch.bfloat16)
    schnell = mp.build_transformer(dict(arch.FLUX1_SCHNELL_TRANSFORMER), torch.bfloat16)
    assert sum(p.numel() for p in dev.parameters()) == 11_901_408_320  # the published "12 B" (11.9 B)
    # schnell: the same blocks without the guidance embedding (two linears, 256 -> 3072 -> 3072)
    assert sum(p.numel() for p in schnell.parameters()) == 11_901_408_320 - (256 * 3072 + 3072 + 3072 * 3072 + 3072)
    assert list(dev.buffers()) == []  # rotary ids: no position table
    assert len(mfam.family_plan("flux").blocks(dev)) == 19 + 38


def test_the_family_is_read_off_the_transformer_config(tmp_path):
    assert mfam.family_of_config(dict(SD35M_TRANSFORMER)).name == "sd3"
    assert mfam.family_of_config(dict(arch.FLUX1_DEV_TRANSFORMER)).name == "flux"
    assert mfam.family_of_config(FLUX_SMALL).name == "flux"
    with pytest.raises(ApexError, match="UNet2DConditionModel"):
        mfam.family_of_config({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ApexError, match="cross_attention_dim"):
        mfam.family_of_config({"cross_attention_dim": 768})
    # a saved FLUX transformer config (a real-shape fixture's cut depth) names its class
    cut = dict(arch.FLUX1_DEV_TRANSFORMER, num_layers=1, num_single_layers=1)
    mp.build_transformer(cut, torch.bfloat16).save_config(tmp_path / "transformer")
    read = mp.transformer_config_for(flux_config(overrides=(f"model.pretrained={tmp_path}",)))
    assert read["_class_name"] == "FluxTransformer2DModel" and read["num_single_layers"] == 1
    assert mfam.family_of_config(read).name == "flux"


@pytest.mark.parametrize(
    ("pretrained", "published"),
    [
        ("black-forest-labs/FLUX.1-dev", arch.FLUX1_DEV_TRANSFORMER),
        ("black-forest-labs/FLUX.1-schnell", arch.FLUX1_SCHNELL_TRANSFORMER),
        ("stabilityai/stable-diffusion-3.5-large", arch.SD35L_TRANSFORMER),
    ],
)
def test_release_ids_map_to_their_published_configs(pretrained, published):
    assert mp.transformer_config_for(flux_config(overrides=(f"model.pretrained={pretrained}",))) == dict(published)


def test_the_built_in_flux_pipeline_plans_its_own_transformer():
    from apexcli.models.tiny_flux import build_tiny_flux_pipeline

    config = mp.transformer_config_for(resolve_config(preset="tiny-flux"))
    assert mfam.family_of_config(config).name == "flux"
    built = build_tiny_flux_pipeline().transformer.config
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {
        k: v for k, v in built.items() if not k.startswith("_")
    }


def test_the_flux_plan_counts_its_own_encoders_and_lora(flux_plan):
    keys = [r.key for r in flux_plan.rows]
    assert "pos_embed" not in keys and "host_pos_embed_build" not in keys  # no position table to build
    assert flux_plan.row("transformer").nbytes == 2 * 11_901_408_320
    # CLIP-L (the plain text model) + T5-XXL, no CLIP-G
    assert flux_plan.row("text_encoders").nbytes == 2 * (123_060_480 + 4_762_310_656)
    # r x (in + out) per adapted layer, Flow-GRPO's FLUX list at r=64: 8 attention projections and 4
    # feed-forward layers (3072 <-> 12288) in each of 19 double-stream blocks, to_q/k/v in each of 38 single-stream ones
    assert flux_plan.row("lora_weights").nbytes == 4 * 64 * (19 * (8 * 6144 + 4 * 15360) + 38 * 3 * 6144)
    assert flux_plan.row("host_weights").nbytes == sum(
        flux_plan.row(k).nbytes for k in ("transformer", "vae", "text_encoders")
    )
    # 16-channel unpacked latents of the 6-step recipe (7 a trajectory), T5 tokens only
    assert flux_plan.row("trajectories").nbytes == 32 * 7 * 16 * 64 * 64 * 4
    assert flux_plan.row("step_embeds").nbytes == 32 * (128 * 4096 + 768) * 2


def test_flux_dev_runs_one_forward_per_sample_and_fits_one_80_gb_gpu(flux_plan):
    step = flux_plan.step
    assert step.checkpointing and step.shape.family == "flux"
    assert (step.shape.forward_batch, step.shape.image_tokens, step.shape.text_tokens) == (4, 1024, 128)
    assert len(step.block_working_set) == 19 + 38
    assert flux_plan.row("train_step").nbytes == step.peak
    assert flux_plan.fits(deqa_on_gpu=True)
    # the 12 B transformer dominates: more than every other resident row together
    assert flux_plan.row("transformer").nbytes > flux_plan.resident() - flux_plan.row("transformer").nbytes


def test_flux_true_cfg_doubles_the_forward_batch_and_the_activations():
    guided = mp.StepShape(2, 16, 24, 3.5, "flux")
    true_cfg = mp.StepShape(2, 16, 24, 3.5, "flux", true_cfg_scale=2.0)
    assert (guided.forward_batch, true_cfg.forward_batch) == (2, 4)
    assert mp.StepShape(2, 16, 24, 1.0, "flux").forward_batch == 2  # the guidance is an input, never a batch
    one = mp.compute_step_memory(FLUX_SMALL, guided, FLUX_LORA, checkpointing=False)
    two = mp.compute_step_memory(FLUX_SMALL, true_cfg, FLUX_LORA, checkpointing=False)
    # every activation doubles; the rotary cos/sin tables (per token, shared by the batch) do not
    assert 1.9 < sum(two.block_saved) / sum(one.block_saved) < 2.0
    # plan_memory reads sampling.true_cfg_scale (with getattr: configs without the key plan one forward)
    cut = dict(arch.FLUX1_DEV_TRANSFORMER, num_layers=1, num_single_layers=1)
    plain = mp.plan_memory(flux_config(), transformer=cut)
    doubled = mp.plan_memory(flux_config(true_cfg=2.0), transformer=cut)
    assert (plain.step.shape.forward_batch, doubled.step.shape.forward_batch) == (4, 8)
    assert (plain.row("rollout_forward").detail, doubled.row("rollout_forward").detail) == (
        "forward batch 8",
        "forward batch 16",
    )
    assert doubled.step.peak > 1.9 * plain.step.peak


def test_a_step_shape_of_another_family_is_refused():
    model = mp.build_transformer(FLUX_SMALL, torch.bfloat16, "meta", FLUX_LORA)
    shape = mp.StepShape(1, 16, 24, 3.5)  # sd3
    with pytest.raises(ValueError, match="flux transformer with the step shape of a sd3"):
        mp.step_memory(model, mp.step_inputs(FLUX_SMALL, shape, "meta"), shape, checkpointing=False)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_meta_computation_matches_a_real_cpu_flux_step(checkpointing):
    shape = mp.StepShape(2, 16, 24, 3.5, "flux")
    computed = mp.compute_step_memory(FLUX_SMALL, shape, FLUX_LORA, checkpointing=checkpointing)
    model = mp.build_transformer(FLUX_SMALL, torch.bfloat16, "cpu", FLUX_LORA)
    mp.allocate_lora_grads(model)
    inputs = mp.step_inputs(FLUX_SMALL, shape, "cpu")
    box: dict = {}
    allocator = mp.cpu_allocator_peak(
        lambda: box.setdefault("step", mp.step_memory(model, inputs, shape, checkpointing=checkpointing))
    )
    measured = box["step"]
    # the CPU's bf16 LayerNorm keeps its statistics in bf16, the meta (and CUDA) one in float32
    assert measured.peak == pytest.approx(computed.peak, rel=0.01)
    assert allocator == pytest.approx(computed.peak, rel=0.10)
    real = measured.block_working_set if checkpointing else measured.block_saved_by_data_ptr
    meta = computed.block_working_set if checkpointing else computed.block_saved
    assert len(real) == len(meta) == 3
    for r, m in zip(real, meta, strict=True):
        assert r == pytest.approx(m, rel=0.01)


def test_the_doctor_memory_row_plans_flux(monkeypatch, flux_plan):
    from apexcli import doctor

    monkeypatch.setattr(doctor, "_host_ram_bytes", lambda: 64 * 2**30)
    (row,) = doctor.memory_rows(flux_config(overrides=("model.device=cpu",)))
    assert row.status == doctor.OK
    assert f"training peak {flux_plan.peak(deqa_on_gpu=True) / mp.GB:.1f} GB" in row.found


def test_the_trainer_plan_reads_a_flux_transformer():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from memory_plan import trainer_plan

    cut = dict(arch.FLUX1_DEV_TRANSFORMER, num_layers=1, num_single_layers=1)
    plan = trainer_plan(flux_config(), cut)
    weights = mp.build_transformer(cut, torch.bfloat16)
    assert plan["transformer"] == 2 * sum(p.numel() for p in weights.parameters())
    assert "pos_embed" not in plan and plan["vae"] == 2 * 83_819_683
    assert plan["lora_weights"] == 4 * 64 * (8 * 6144 + 4 * 15360 + 3 * 6144)  # one block of each kind, r=64
    assert plan["total"] == sum(v for k, v in plan.items() if k != "total")
