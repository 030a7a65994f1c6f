"""The memory plan (``models/memory_plan.py``): exact counts, what moves the activations, and a real
CPU measurement that the meta-device computation has to reproduce."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apexcli.config import SD3_JOINT_ATTENTION_PROJECTIONS, resolve_config
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
SMALL_LORA = dict(rank=4, alpha=8, dropout=0.0, target_modules=SD3_JOINT_ATTENTION_PROJECTIONS, seed=0)
SD35M_CUT = dict(SD35M_TRANSFORMER, num_layers=3, dual_attention_layers=(0,))
SD35M_LORA = dict(rank=32, alpha=64, dropout=0.0, target_modules=SD3_JOINT_ATTENTION_PROJECTIONS, seed=0)


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
