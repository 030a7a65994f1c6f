"""Resume: 4 steps straight == 2 steps + ``--resume auto`` + 2 steps, bit for bit on CPU."""

from __future__ import annotations

import json

import pytest
import torch

from apexcli.errors import ApexError
from apexcli.runs import LORA_FILE, RunDir
from apexcli.train.run_start import resolve_resume
from helpers import load_lora_file, read_metrics, train_tiny

OBJECTIVES = ("--objectives", "brightness,colorfulness")


def _without_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


# Besides the plain tiny run: every piece of state a resume must restore at once (EMA and its
# update count under a schedule, Adam moments under accumulation, LR warm-up, the apex balancer
# with a gradient probe and a progress probe each step, per-epoch timestep subsets) and the other sampling paths
# (CPS, CFG, shared group noise).
EVERYTHING = (
    "train.ema_decay=0.9",
    "train.optimizer_steps_per_epoch=2",
    "train.timestep_fraction=0.5",
    "train.inner_epochs=2",
    "train.warmup_steps=3",
    "balance.probe_every=1",
    "balance.experimental.progress_prompts=2",
    "balance.apex.warmup=0",
    "sampling.share_group_noise=true",
    "sampling.sampler=cps",
    "sampling.guidance_scale=2.0",
    "train.ema_every=3",
    "train.ema_warmup=true",
    "lora.init=gaussian",
    "train.kl_form=reference",
)


@pytest.fixture(scope="module", params=[(), EVERYTHING], ids=["plain", "everything"])
def straight_and_resumed(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    extra = (*OBJECTIVES, "train.checkpoint_every=2", *request.param)
    straight = train_tiny(root / "straight", 4, *extra)
    resumed = train_tiny(root / "resumed", 2, *extra)
    ckpts = resumed / "checkpoints"
    # what a crash leaves behind, and what resume must not pick:
    # a save interrupted before its rename (a hidden temp dir) ...
    (ckpts / ".step-000003.x1y2.tmp" / "state").mkdir(parents=True)
    (ckpts / ".step-000003.x1y2.tmp" / LORA_FILE).write_bytes(b"half a file")
    # ... a step dir without its LoRA file ...
    (ckpts / "step-000003" / "state").mkdir(parents=True)
    # ... and metrics logged after the last checkpoint
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "kind": "train", "loss": 123.0}) + "\n")
    train_tiny(resumed, 4, *extra, resume="auto")
    return straight, resumed, request.param


def test_resumed_lora_is_identical(straight_and_resumed):
    straight, resumed, extra = straight_and_resumed
    with_ema = "train.ema_decay=0.9" in extra
    assert (straight / "checkpoints" / "step-000004" / "ema" / LORA_FILE).exists() == with_ema
    for sub in ("", "ema") if with_ema else ("",):
        a = load_lora_file(straight / "checkpoints" / "step-000004" / sub)
        b = load_lora_file(resumed / "checkpoints" / "step-000004" / sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    a = load_lora_file(straight / "checkpoints" / "step-000004")
    # and training did move them between the two checkpoints
    mid = load_lora_file(straight / "checkpoints" / "step-000002")
    assert any(not torch.equal(a[k], mid[k]) for k in a)


def test_resumed_metrics_are_identical(straight_and_resumed):
    straight, resumed, _ = straight_and_resumed
    rows_a, rows_b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]  # the orphan step-3 row was dropped
    assert [_without_times(r) for r in rows_a] == [_without_times(r) for r in rows_b]


def test_resume_records_both_commands(straight_and_resumed):
    _, resumed, _ = straight_and_resumed
    lines = (resumed / "command.txt").read_text().splitlines()
    assert len(lines) == 2 and "--resume auto" in lines[1] and "--resume" not in lines[0]


def test_resume_clears_what_the_crash_left(straight_and_resumed):
    _, resumed, _ = straight_and_resumed
    ckpts = resumed / "checkpoints"
    assert not (ckpts / ".step-000003.x1y2.tmp").exists()  # the interrupted save's temp dir
    (abandoned,) = ckpts.glob("abandoned-*-after-step-000002")  # the incomplete step-3 dir, with the orphan row
    assert (abandoned / "step-000003" / "state").is_dir()
    assert json.loads((abandoned / "metrics.jsonl").read_text())["loss"] == 123.0
    assert RunDir(resumed).checkpoint_steps() == [2, 4]


def test_resolve_resume(tmp_path):
    from safetensors.torch import save_file

    from apexcli.train.checkpoint import TrainingState, save_checkpoint

    run = RunDir(tmp_path / "run")
    assert resolve_resume(run, "auto").checkpoint is None  # nothing yet: a fresh start
    for step in (2, 4):
        state = TrainingState(step=step, optimizer={}, lr_scheduler={}, balancer={}, ema=None, rng={})
        save_checkpoint(
            run,
            step,
            save_lora=lambda d: save_file({"a": torch.zeros(1)}, str(d / LORA_FILE)),
            save_ema_lora=None,
            state=state,
            config_yaml="seed: 1\n",
            keep=0,
        )
    (run.checkpoint_dir(6) / "state").mkdir(parents=True)  # incomplete
    (run.checkpoints_dir / ".step-000008.abc.tmp").mkdir()  # interrupted save
    plan = resolve_resume(run, "auto")
    assert plan.checkpoint == run.checkpoint_dir(4) and plan.state.step == 4
    assert plan.skipped == [f"step-000006: {LORA_FILE} is missing"]
    assert resolve_resume(run, str(run.checkpoint_dir(2))).checkpoint == run.checkpoint_dir(2)
    assert resolve_resume(run, str(run.path)).checkpoint == run.checkpoint_dir(4)
    with pytest.raises(ApexError, match="--resume"):
        resolve_resume(run, str(tmp_path / "elsewhere"))
