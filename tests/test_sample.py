"""``apex sample``: PNGs + metadata.jsonl, reproducible seeds, LoRA from a run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import run_cli

TINY_SAMPLE = ["--preset", "tiny", "--steps", "3", "--size", "32"]


def _sample(out, *extra) -> list[dict]:
    result = run_cli(["sample", *TINY_SAMPLE, "--out", str(out), *extra])
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def _pixels(out, row) -> np.ndarray:
    return np.asarray(Image.open(out / row["file"]).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def lora_samples(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("samples") / "lora"
    return out, _sample(out, "--lora", str(tiny_run), "--prompt", "a red apple", "--num-images", "2")


def test_pngs_and_metadata(lora_samples, tiny_run):
    out, rows = lora_samples
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)
    assert len(rows) == 2
    for i, row in enumerate(rows):
        assert {"file", "prompt", "seed", "steps", "guidance", "lora"} <= row.keys()
        assert row["prompt"] == "a red apple" and row["seed"] == i and row["steps"] == 3
        assert row["guidance"] == 1.0  # the tiny preset's eval.guidance_scale
        # a run dir as --lora means its latest checkpoint
        assert row["lora"] == str(tiny_run / "checkpoints" / "step-000003")
        image = Image.open(out / row["file"])
        assert image.size == (32, 32) and image.mode == "RGB"
    assert not np.array_equal(_pixels(out, rows[0]), _pixels(out, rows[1]))  # different seeds


def test_same_seed_same_image_whatever_the_batch(lora_samples, tiny_run, tmp_path):
    out, rows = lora_samples
    again = _sample(tmp_path, "--lora", str(tiny_run), "--prompt", "a red apple", "--seed", "1", "--batch-size", "1")
    assert again[0]["seed"] == 1
    # the same noise; a batch of 1 and of 2 round differently in the last float bits, which can
    # tip a pixel that sits on a quantisation boundary by one level, never more
    diff = np.abs(_pixels(tmp_path, again[0]) - _pixels(out, rows[1]))
    assert diff.max() <= 1 and (diff > 0).sum() <= 3
    assert np.abs(_pixels(tmp_path, again[0]) - _pixels(out, rows[0])).max() > 10  # another seed is another image


def test_lora_changes_the_images(lora_samples, tmp_path):
    out, rows = lora_samples
    base = _sample(tmp_path, "--prompt", "a red apple", "--num-images", "2")
    assert all(r["lora"] is None for r in base)
    # 3 small Adam steps move few pixels by more than a rounding step, but hundreds of values change
    changed = [int((_pixels(tmp_path, b) != _pixels(out, r)).sum()) for b, r in zip(base, rows)]
    assert all(c > 50 for c in changed), changed


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n# a comment\na dog\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a bird"}) + "\n")
    rows = _sample(tmp_path / "txt", "--prompts", str(tmp_path / "p.txt"), "--prompt", "a cow")
    assert [r["prompt"] for r in rows] == ["a cow", "a cat", "a dog"]
    assert len({r["file"] for r in rows}) == 3
    rows = _sample(tmp_path / "jsonl", "--prompts", str(tmp_path / "p.jsonl"))
    assert [r["prompt"] for r in rows] == ["a bird"]


def test_lora_file_is_loaded_even_beside_other_files(tiny_run, tmp_path):
    """--lora FILE.safetensors loads that file, not whichever .safetensors diffusers guesses."""
    trained = tiny_run / "checkpoints" / "step-000003" / "pytorch_lora_weights.safetensors"
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "mine.safetensors").write_bytes(trained.read_bytes())
    zeros = {k: torch.zeros_like(v) for k, v in load_file(str(trained)).items()}
    save_file(zeros, str(folder / "aaa_zero.safetensors"))  # a decoy that sorts first
    again = _sample(tmp_path / "s", "--lora", str(folder / "mine.safetensors"), "--prompt", "a red apple")
    assert again[0]["lora"] == str(folder / "mine.safetensors")
    # the run directory's LoRA at the same batch size (1): bit for bit the same images
    ref = _sample(tmp_path / "r", "--lora", str(tiny_run), "--prompt", "a red apple")
    assert np.array_equal(_pixels(tmp_path / "s", again[0]), _pixels(tmp_path / "r", ref[0]))


def test_overrides_set_what_the_options_set(tmp_path):
    """``eval.num_steps=2`` is ``--steps 2``; ``--set`` is the same as a positional override."""
    by_option = _sample(tmp_path / "option", "--prompt", "a red apple", "--steps", "2")
    tiny = ["--preset", "tiny", "--size", "32", "--prompt", "a red apple"]
    for name, extra in (("positional", ["eval.num_steps=2"]), ("set", ["--set", "eval.num_steps=2"])):
        result = run_cli(["sample", *tiny, "--out", str(tmp_path / name), *extra])
        assert result.code == 0, result.stderr
        row = json.loads((tmp_path / name / "metadata.jsonl").read_text())
        assert row["steps"] == 2
        assert np.array_equal(_pixels(tmp_path / name, row), _pixels(tmp_path / "option", by_option[0]))


def test_resolution_override_and_explicit_options_win(tmp_path):
    result = run_cli(
        [
            "sample",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--prompt",
            "a",
            "--out",
            str(tmp_path / "r"),
            "model.resolution=32",
        ]
    )
    assert result.code == 0, result.stderr
    row = json.loads((tmp_path / "r" / "metadata.jsonl").read_text())
    assert Image.open(tmp_path / "r" / row["file"]).size == (32, 32) and row["height"] == row["width"] == 32
    # --steps, --size, --model and --device given beside overrides of the same settings: the options win
    rows = _sample(
        tmp_path / "w",
        "--prompt",
        "a",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "eval.num_steps=5",
        "model.resolution=64",
        "model.pretrained=/no/such/model",
        "model.device=cuda:7",
    )
    assert rows[0]["steps"] == 3 and Image.open(tmp_path / "w" / rows[0]["file"]).size == (32, 32)


def test_unknown_override_key_is_a_one_line_error(tmp_path):
    result = run_cli(["sample", *TINY_SAMPLE, "--prompt", "a", "--out", str(tmp_path / "s"), "eval.num_stepz=2"])
    assert result.code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'eval.num_stepz'" in lines[0]
    assert not (tmp_path / "s").exists()


def _one_line_error(argv: list[str]) -> str:
    result = run_cli(argv)
    assert result.code == 2, (result.code, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_an_earlier_output_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "s"
    first = _sample(out, "--prompt", "a red apple", "--num-images", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = _one_line_error(["sample", *TINY_SAMPLE, "--out", str(out), "--prompt", "a dog"])
    assert "already holds apex sample output" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing overwritten
    again = _sample(out, "--prompt", "a dog", "--overwrite")
    assert [r["prompt"] for r in again] == ["a dog"] and len(first) == 2
    assert sorted(p.name for p in out.iterdir()) == ["00000-seed0.png", "metadata.jsonl"]  # the old second image too
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")  # a folder of other files is no sample output
    assert len(_sample(tmp_path / "notes", "--prompt", "a")) == 1 and (tmp_path / "notes" / "notes.txt").is_file()


def test_each_image_lands_with_its_metadata_line(tmp_path, monkeypatch):
    """The metadata was written only at the end: an interrupted run left images no file described."""
    import apexcli.sample as sample_module

    real_save = sample_module._save_png
    saved = []

    def save_twice_then_stop(image, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(image, path)
        saved.append(path.name)

    monkeypatch.setattr(sample_module, "_save_png", save_twice_then_stop)
    result = run_cli(
        ["sample", *TINY_SAMPLE, "--out", str(tmp_path), "--prompt", "a", "--num-images", "4", "--batch-size", "4"]
    )
    assert result.code == 130
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == saved == sorted(p.name for p in tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--size", "100000", "--size 100000 is beyond the limit of 4096"),
        ("--seed", str(2**70), "--seed 1180591620717411303424: the seeds of its images"),
        ("--device", "garbage", "'garbage' is not a device; use auto, cpu, cuda or cuda:N"),
        ("--num-images", "100000000", "= 100000000 images, more than the limit of 100000 per call"),
    ],
)
def test_absurd_values_are_one_line_errors(tmp_path, option, value, message):
    """Tracebacks before: an allocation of 40 GB, an overflow in torch's seed, torch's device
    parser; and 10.7 GB of job list before the first image of --num-images 100000000."""
    line = _one_line_error(["sample", *TINY_SAMPLE, "--out", str(tmp_path / "s"), "--prompt", "a", option, value])
    assert message in line
    assert not (tmp_path / "s").exists()


def test_out_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = run_cli(["sample", *TINY_SAMPLE, "--out=~/imgs", "--prompt", "a"])
    assert result.code == 0, result.stderr
    assert (tmp_path / "home" / "imgs" / "metadata.jsonl").is_file() and not (tmp_path / "~").exists()


def test_a_runs_lora_without_a_preset_samples_as_the_run_evaluates(tiny_run, tmp_path):
    """No --preset or --config: the run's own config gives the model (the default would be the
    SD3.5 release, not on this machine), its steps and guidance, whether --lora names the run,
    one of its checkpoints or the LoRA file; an explicit option still wins."""
    from apexcli.runs import LORA_FILE, run_config_of

    ckpt = tiny_run / "checkpoints" / "step-000003"
    for lora in (tiny_run, ckpt, ckpt / LORA_FILE):
        assert run_config_of(lora) == tiny_run / "config.yaml"
    assert run_config_of(tmp_path) is None
    out = tmp_path / "samples"
    result = run_cli(["sample", "--lora", str(ckpt), "--prompt", "a red apple", "--steps", "2", "--out", str(out)])
    assert result.code == 0, result.stderr[-2000:]
    (row,) = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert row["steps"] == 2 and row["guidance"] == 1.0  # --steps wins; the tiny run's eval guidance
    assert Image.open(out / row["file"]).size == (32, 32)  # the run's model.resolution (TINY_OVERRIDES)
