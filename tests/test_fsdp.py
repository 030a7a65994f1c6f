"""FSDP2 (``fully_shard``) with the shipped ``examples/accelerate/fsdp_8gpu.yaml`` on two CPU
processes (gloo), against DDP on the same two processes.

The FSDP settings come from accelerate's own translation of that config file into the
launcher's environment (``prepare_multi_gpu_env``), with 2 processes instead of 8. accelerate
enables FSDP only on accelerator devices, so the launcher below switches its state to FSDP after
accelerate's own set-up; torch's FSDP2 itself runs on CPU. Everything else is the real CLI.
Covered: every LoRA parameter is a shard, training matches DDP step for step (the probe's Gram
too), evaluation with unequal prompt shares runs in lockstep, and checkpoints hold whole
tensors, so a run saved under FSDP resumes under DDP to the same weights; a bf16 base and
compiled blocks work under FSDP too, and FLUX.1 shards its double- and single-stream blocks with
the same config file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import TINY_OVERRIDES, load_lora_file, needs_cpp_compiler, read_metrics, torchrun, train_tiny

# minutes of two-process training (and a compile) on a CPU: `make test-all` runs them
pytestmark = pytest.mark.slow

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "accelerate" / "fsdp_8gpu.yaml"

LAUNCHER = '''
import json, os, sys

if sys.argv[1] == "fsdp":
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init_fsdp_on_cpu

from apexcli.train import trainer as trainer_module

close = trainer_module.Trainer.close


def close_and_report(self):
    """Each rank reports how its LoRA is laid out: local elements against whole elements."""
    if getattr(self, "lora_params", None):
        from apexcli.sharding import local_tensor

        from torch.distributed.fsdp import FSDPModule

        units = sorted({type(m).__name__.removeprefix("FSDP") for m in self.transformer.modules() if isinstance(m, FSDPModule)})
        report = {"sharded": self.sharded, "local": sum(local_tensor(p).numel() for p in self.lora_params),
                  "whole": sum(p.numel() for p in self.lora_params), "units": units}
        with open(os.path.join(sys.argv[2], f"layout{self.accelerator.process_index}.json"), "w") as f:
            json.dump(report, f)
    close(self)


trainer_module.Trainer.close = close_and_report
from apexcli.cli import main

main(sys.argv[3:])
'''

# 3 eval prompts in batches of 1: rank 0 has two, rank 1 one, so FSDP pads rank 1 with a batch;
# EMA, a gradient probe and a progress probe (3 prompts) every step exercise the gathers of shadow
# weights, of the Gram and of the progress scores (padded and broadcast like the eval's).
ARGV = [
    "train",
    "--preset",
    "tiny",
    "--objectives",
    "brightness,colorfulness",
    *TINY_OVERRIDES,
    "eval.every=3",
    "eval.num_prompts=3",
    "eval.num_steps=3",
    "eval.batch_size=1",
    "train.ema_decay=0.9",
    "balance.probe_every=1",
    "balance.experimental.progress_prompts=3",
]
COMPARED = (
    "loss",
    "kl",
    "ratio_mean",
    "grad_norm",
    "balance/weight/brightness",
    "balance/weight/colorfulness",
    "balance/progress/brightness",
    "balance/progress/colorfulness",
    "reward/brightness/mean",
    "reward/colorfulness/mean",
)


def _launch(tmp: Path, layout: str, out: Path, *extra: str, argv: list[str] = ARGV) -> None:
    launcher = tmp / "launch.py"
    launcher.write_text(LAUNCHER)
    report_dir = out.parent / f"{out.name}-{layout}-layout"
    report_dir.mkdir(parents=True, exist_ok=True)
    env = _fsdp_launch_env() if layout == "fsdp" else None
    proc = torchrun(launcher, 2, [layout, str(report_dir), *argv, "--out", str(out), *extra], env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _fsdp_launch_env() -> dict[str, str]:
    """What ``accelerate launch --config_file fsdp_8gpu.yaml --num_processes 2`` exports."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(FSDP_CONFIG), "--num_processes", "2", "--main_process_port", "0", "train.py"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}


def _layout(out: Path, layout: str, rank: int) -> dict:
    return json.loads((out.parent / f"{out.name}-{layout}-layout" / f"layout{rank}.json").read_text())


def _final_lora(out: Path, sub: str = "") -> dict[str, torch.Tensor]:
    return load_lora_file(out / "checkpoints" / "step-000003" / sub)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    # FSDP with gradient checkpointing, as the sd35l recipe runs it (checkpointing changes no number)
    _launch(tmp, "fsdp", tmp / "fsdp", "--steps", "3", "model.gradient_checkpointing=true")
    _launch(tmp, "ddp", tmp / "ddp", "--steps", "3")
    return tmp


def test_every_lora_parameter_is_a_shard(runs):
    for rank in (0, 1):
        fsdp, ddp = _layout(runs / "fsdp", "fsdp", rank), _layout(runs / "ddp", "ddp", rank)
        assert fsdp["sharded"] and not ddp["sharded"]
        assert fsdp["whole"] == ddp["whole"] == ddp["local"]
        assert fsdp["local"] < 0.75 * fsdp["whole"], fsdp  # about half on each of two ranks
        assert "JointTransformerBlock" in fsdp["units"]


def test_training_matches_ddp_step_for_step(runs):
    fsdp, ddp = read_metrics(runs / "fsdp"), read_metrics(runs / "ddp")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [1, 2, 3]
    for a, b in zip(fsdp, ddp):
        assert a["ratio_first"] == pytest.approx(1.0, abs=1e-5)
        assert a["balance/cp_exact"] == b["balance/cp_exact"]  # the probe ran under both layouts
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    assert fsdp[-1]["balance/cp_exact"] == 1.0
    assert fsdp[-1]["grad_norm"] > 0


def test_saved_lora_and_ema_are_whole_and_equal_to_ddp(runs):
    for sub in ("", "ema"):
        fsdp, ddp = _final_lora(runs / "fsdp", sub), _final_lora(runs / "ddp", sub)
        assert fsdp.keys() == ddp.keys()
        moved = max(v.abs().max().item() for k, v in ddp.items() if "lora_B" in k)
        assert moved > 1e-3  # trained: B starts at 0
        for k in ddp:
            assert fsdp[k].shape == ddp[k].shape
            assert torch.allclose(fsdp[k], ddp[k], atol=1e-5), k


def test_lockstep_evaluation_equals_ddp(runs):
    fsdp, ddp = read_metrics(runs / "fsdp", "eval"), read_metrics(runs / "ddp", "eval")
    assert [r["step"] for r in fsdp] == [r["step"] for r in ddp] == [0, 3]
    for a, b in zip(fsdp, ddp):
        for key in ("eval/brightness/mean", "eval/colorfulness/mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
    scores = (runs / "fsdp" / "eval" / "step-000003" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == 3  # the padding batch is discarded


@pytest.mark.parametrize("first, then", [("fsdp", "ddp"), ("ddp", "fsdp")])
def test_checkpoints_resume_across_layouts(runs, first, then):
    out = runs / f"{first}-then-{then}"
    _launch(runs, first, out, "--steps", "2")
    _launch(runs, then, out, "--steps", "3", "--resume", "auto")
    for sub in ("", "ema"):
        resumed, straight = _final_lora(out, sub), _final_lora(runs / "ddp", sub)
        for k in straight:
            assert torch.allclose(resumed[k], straight[k], atol=1e-5), (sub, k)


def test_bf16_base_with_float32_lora_under_fsdp_matches_one_process(runs):
    """FSDP2 gathers a bf16 base and a float32 LoRA in the same shard units."""
    out = runs / "fsdp-bf16"
    _launch(runs, "fsdp", out, "--steps", "1", "model.dtype=bfloat16", "eval.every=0")
    one = read_metrics(
        train_tiny(
            runs / "one-bf16",
            1,
            "--objectives",
            "brightness,colorfulness",
            "model.dtype=bfloat16",
            "train.ema_decay=0.9",
            "balance.probe_every=1",
        )
    )[0]
    fsdp = read_metrics(out)[0]
    assert fsdp["ratio_first"] == pytest.approx(1.0, abs=1e-5)
    assert fsdp["grad_norm"] > 0
    assert fsdp["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert _layout(out, "fsdp", 0)["sharded"]


@needs_cpp_compiler
def test_compiled_blocks_under_fsdp_match_ddp(runs):
    """model.compile compiles each block's forward in place: FSDP's gathers stay outside the
    compiled code, and every forward (rollout, update, reference, probe) runs compiled."""
    out = runs / "fsdp-compiled"
    _launch(runs, "fsdp", out, "--steps", "2", "model.compile=true", "eval.every=0")
    ddp = read_metrics(runs / "ddp")
    for a, b in zip(read_metrics(out), ddp[:2]):
        assert a["ratio_first"] == pytest.approx(1.0, abs=1e-5)
        assert a["balance/cp_exact"] == b["balance/cp_exact"]
        for key in COMPARED:
            # progress is a difference of two probe means over their spread: compiled kernels'
            # rounding (1e-7 in a reward) reaches it as about 1e-4 of a start-std
            tol = {"abs": 1e-3} if key.startswith("balance/progress/") else {"rel": 1e-4, "abs": 1e-7}
            assert a[key] == pytest.approx(b[key], **tol), (a["step"], key)


def test_flux_under_fsdp_is_the_one_process_update(tmp_path):
    """The same config file shards FLUX.1's double- and single-stream blocks (the model's own
    ``_no_split_modules``); the two-rank FSDP run makes the one-process updates."""
    from helpers import run_cli

    argv = ["train", "--preset", "tiny-flux", "--steps", "2", *TINY_OVERRIDES, "train.checkpoint_every=2"]
    result = run_cli([*argv, "--out", str(tmp_path / "one")])
    assert result.code == 0, result.stderr[-3000:]
    _launch(tmp_path, "fsdp", tmp_path / "fsdp", argv=argv)
    layout = _layout(tmp_path / "fsdp", "fsdp", 0)
    assert layout["sharded"] and layout["local"] < 0.75 * layout["whole"]
    assert {"FluxTransformerBlock", "FluxSingleTransformerBlock"} <= set(layout["units"])
    one, fsdp = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "fsdp")
    for a, b in zip(fsdp, one, strict=True):
        assert a["ratio_first"] == pytest.approx(1.0, abs=1e-5)
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), (a["step"], key)
    straight = load_lora_file(tmp_path / "one" / "checkpoints" / "step-000002")
    sharded = load_lora_file(tmp_path / "fsdp" / "checkpoints" / "step-000002")
    assert sharded.keys() == straight.keys() and any("single_transformer_blocks" in k for k in straight)
    assert all(torch.allclose(sharded[k], straight[k], atol=1e-5) for k in straight)
