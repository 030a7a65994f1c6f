"""The mini pretraining script: deterministic from its seed given the step counts, and its
export loads through the same load_pipeline path as SD3.5 (a local diffusers directory)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from apexcli.config import ModelConfig
from apexcli.models.loading import load_pipeline
from apexcli.world.pretrain import main as pretrain_main

# A few steps of each phase, no clock limit, the grid at 2 sampling steps: seconds on a CPU.
QUICK = ["--minutes", "1000", "--set", "vae_minutes=1000", "--set", "vae_steps=3", "--set", "flow_steps=3",
         "--set", "sample_steps=2", "--set", "export_every=1000"]


def _weights(export):
    return load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")


def test_pretrain_is_deterministic_and_its_export_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("APEX_MINI_THREADS", "1")
    for name in ("a", "b"):
        pretrain_main(["--out", str(tmp_path / name), "--export", str(tmp_path / f"{name}-model"), "--seed", "3", *QUICK])
    first, second = _weights(tmp_path / "a-model"), _weights(tmp_path / "b-model")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    rows = [json.loads(line) for line in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert {"vae", "flow", "flow_done"} <= {r["phase"] for r in rows}
    pipe = load_pipeline(ModelConfig(pretrained=str(tmp_path / "a-model"), dtype="float32", device="cpu"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.transformer.dtype == torch.float32 and pipe.scheduler.config.shift == 2.0
