"""The mini pretraining script: deterministic from its seed given the step counts, and its
export loads through the same load_pipeline path as SD3.5 (a local diffusers directory)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from apexcli.config import ModelConfig
from apexcli.models.loading import load_pipeline
from apexcli.tools.mini_pretrain import main as pretrain_main

# A few steps of each phase, no clock limit, the grid at 2 sampling steps: seconds on a CPU.
QUICK = [
    "--minutes",
    "1000",
    "--set",
    "vae_minutes=1000",
    "--set",
    "vae_steps=3",
    "--set",
    "flow_steps=3",
    "--set",
    "sample_steps=2",
    "--set",
    "export_every=1000",
]


def _weights(export):
    return load_file(export / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory):
    """Two quick runs of the clean phases from one seed: a/, a-model/, b/, b-model/."""
    tmp_path = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APEX_MINI_THREADS", "1")
        for name in ("a", "b"):
            pretrain_main(
                ["--out", str(tmp_path / name), "--export", str(tmp_path / f"{name}-model"), "--seed", "3", *QUICK]
            )
    return tmp_path


def test_pretrain_is_deterministic_and_its_export_loads(clean_runs):
    tmp_path = clean_runs
    first, second = _weights(tmp_path / "a-model"), _weights(tmp_path / "b-model")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    rows = [json.loads(line) for line in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert {"vae", "flow", "flow_done"} <= {r["phase"] for r in rows}
    pipe = load_pipeline(ModelConfig(pretrained=str(tmp_path / "a-model"), dtype="float32", device="cpu"))
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.transformer.dtype == torch.float32 and pipe.scheduler.config.shift == 2.0


def test_caption_noise_phase_from_an_export_is_deterministic(clean_runs, tmp_path, monkeypatch):
    """--init runs only the caption-noise phase on a clean export: deterministic, it moves the
    weights, and what it exports loads like any SD3 directory."""
    monkeypatch.setenv("APEX_MINI_THREADS", "1")
    noisy = ["--set", "noisy_steps=3", "--set", "attribute_noise=0.5", "--set", "letter_noise=0.5"]
    for name in ("a", "b"):
        pretrain_main(
            [
                "--out",
                str(tmp_path / name),
                "--export",
                str(tmp_path / f"{name}-model"),
                "--seed",
                "3",
                "--init",
                str(clean_runs / "a-model"),
                *QUICK,
                *noisy,
            ]
        )
    clean = _weights(clean_runs / "a-model")
    first, second = (_weights(tmp_path / d) for d in ("a-model", "b-model"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], clean[k]) for k in first)
    rows = [json.loads(line) for line in (tmp_path / "a" / "loss.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"noisy", "noisy_done"}  # no VAE or clean flow phase
    pipe = load_pipeline(ModelConfig(pretrained=str(tmp_path / "a-model"), dtype="float32", device="cpu"))
    assert pipe.transformer.dtype == torch.float32


def test_init_without_noisy_steps_or_an_export_is_a_one_line_error(tmp_path, capsys):
    cases = [
        (["--init", str(tmp_path)], "noisy_steps"),
        (["--init", str(tmp_path), "--set", "noisy_steps=2"], "model_index.json"),
    ]
    for args, culprit in cases:
        with pytest.raises(SystemExit):
            pretrain_main(["--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--init" in err and culprit in err
    assert not (tmp_path / "run").exists()  # nothing written before the check
