"""apex soup: exact LoRA interpolation, compatibility errors, evaluated mixture runs in apex pareto."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import save_file

from apexcli.errors import ApexError
from apexcli.eval.report import run_pareto
from apexcli.runs import LORA_FILE, RunDir
from apexcli.soup import (
    META_KEY,
    LoraFile,
    delta_weights,
    load_parents,
    make_soups,
    mix_loras,
    parse_coefficients,
    read_lora,
)
from apexcli.train import run_training
from helpers import run_cli


def lora(seed: int, r: int = 2, alpha: int = 4, rslora: bool = False) -> LoraFile:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in ("blocks.0.attn.to_q", "blocks.0.attn.to_k"):
        tensors[f"transformer.{m}.lora_A.weight"] = torch.randn(r, 6, generator=gen)
        tensors[f"transformer.{m}.lora_B.weight"] = torch.randn(5, r, generator=gen)
    meta = {
        "transformer.r": r,
        "transformer.lora_alpha": alpha,
        "transformer.use_rslora": rslora,
        "transformer.rank_pattern": {},
        "transformer.alpha_pattern": {},
    }
    return LoraFile(tensors, {META_KEY: json.dumps(meta), "format": "pt"})


def test_a_one_zero_coefficient_reproduces_the_parent_exactly():
    a, b = lora(0), lora(1)
    for coefs, parent in (([1.0, 0.0], a), ([0.0, 1.0], b)):
        mixed = mix_loras([a, b], coefs)
        assert mixed.metadata == parent.metadata
        assert mixed.tensors.keys() == parent.tensors.keys()
        assert all(torch.equal(mixed.tensors[k], parent.tensors[k]) for k in parent.tensors)


@pytest.mark.parametrize("rslora", [False, True])
def test_a_half_mix_applies_the_average_weight_change(rslora):
    a, b = lora(0, rslora=rslora), lora(1, rslora=rslora)
    mixed = mix_loras([a, b], [0.5, 0.5])
    meta = json.loads(mixed.metadata[META_KEY])
    assert meta["transformer.r"] == 4
    assert meta["transformer.lora_alpha"] == (pytest.approx(4 * math.sqrt(2)) if rslora else 8)
    da, db, dm = delta_weights(a), delta_weights(b), delta_weights(mixed)
    for module in da:
        assert torch.allclose(dm[module], 0.5 * (da[module] + db[module]), atol=1e-12)
    # three parents, uneven weights: W0 + sum_i c_i s B_i A_i
    c = lora(2, rslora=rslora)
    dm3 = delta_weights(mix_loras([a, b, c], [0.2, 0.3, 0.5]))
    dc = delta_weights(c)
    for module in da:
        assert torch.allclose(dm3[module], 0.2 * da[module] + 0.3 * db[module] + 0.5 * dc[module], atol=1e-12)


def test_bad_coefficients_and_mismatched_loras_are_refused():
    assert parse_coefficients([], 2) == [[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]]
    assert parse_coefficients(["0.2,0.3,0.5"], 3) == [[0.2, 0.3, 0.5]]
    for texts, n, message in [
        ([], 3, "give --coef for a soup of 3 runs"),
        (["0.5"], 2, "has 1 values for 2 runs"),
        (["0.7,0.7"], 2, "must be >= 0 and sum to 1"),
        (["-0.5,1.5"], 2, "must be >= 0 and sum to 1"),
        (["a,b"], 2, "not a comma-separated list"),
    ]:
        with pytest.raises(ApexError, match=message):
            parse_coefficients(texts, n)
    other = lora(1)
    other.tensors.pop("transformer.blocks.0.attn.to_k.lora_A.weight")
    with pytest.raises(ApexError, match="adapt different modules"):
        mix_loras([lora(0), other], [0.5, 0.5])


def fake_run(root: Path, name: str, **config_changes) -> Path:
    run = root / name
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    config = {
        "name": name,
        "objectives": ["brightness"],
        "model": {
            "pretrained": "tiny",
            "revision": None,
            "variant": None,
            "tiny_seed": 0,
            "resolution": 32,
            "max_sequence_length": 16,
        },
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["to_q", "to_k"]},
        "eval": {"num_prompts": 3, "num_steps": 3, "guidance_scale": 4.5, "seed": 1, "use_ema": True},
        "prompts": {"eval": "builtin:mixed_eval"},
        "sampling": {"negative_prompt": ""},
    }
    for dotted, value in config_changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text("")
    lo = lora(0)
    save_file(lo.tensors, str(ckpt / LORA_FILE), metadata=lo.metadata)
    return run


@pytest.mark.parametrize(
    "change, key",
    [
        ({"lora__rank": 4}, "lora.rank"),
        ({"lora__target_modules": ["to_q"]}, "lora.target_modules"),
        ({"model__pretrained": "other/model"}, "model.pretrained"),
        ({"eval__seed": 7}, "eval.seed"),
    ],
)
def test_incompatible_runs_are_refused_with_the_key(tmp_path, change, key):
    a = fake_run(tmp_path, "a")
    b = fake_run(tmp_path, "b", **change)
    with pytest.raises(ApexError, match=f"different .*\\({key}: "):
        load_parents([a, b])
    assert [p.name for p in load_parents([a, fake_run(tmp_path, "c")])] == ["a", "c"]
    with pytest.raises(ApexError, match="not a run directory"):
        load_parents([a, tmp_path / "nope"])
    with pytest.raises(ApexError, match="two or more runs"):
        load_parents([a])


def test_parents_use_the_ema_weights_when_their_eval_does(tmp_path):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", eval__use_ema=False)
    for run in (a, b):
        ema = run / "checkpoints" / "step-000002" / "ema"
        ema.mkdir()
        save_file(lora(5).tensors, str(ema / LORA_FILE), metadata=lora(5).metadata)
    pa, pb = load_parents([a, b])
    assert pa.lora_dir.name == "ema" and pb.lora_dir.name == "step-000002"


# ------------------------------------------------------------------ end to end on the tiny preset
SMALL = {
    "objectives": ["brightness", "contrast"],
    "train": {
        "steps": 2,
        "prompts_per_step": 2,
        "group_size": 2,
        "rollout_batch_size": 4,
        "train_batch_size": 2,
        "checkpoint_every": 0,
        "lr": 3e-3,
    },
    "sampling": {"num_steps": 3},
    "eval": {"every": 2, "num_prompts": 4, "num_steps": 3, "batch_size": 4},
    "logging": {"progress": False},
}


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("soup")
    runs = []
    for name, strategy in (("a", "apex"), ("b", "static")):
        out = root / "runs" / name
        run_training(
            preset="tiny", options={**SMALL, "out": str(out), "balance": {"strategy": strategy}}, argv=["test"]
        )
        runs.append(out)
    return root, runs


def _eval_rows(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_metrics().rows if r["kind"] == "eval"]


def test_soup_runs_are_evaluated_and_compared_by_pareto(parents, tmp_path):
    root, (a, b) = parents
    out = tmp_path / "soups"
    # the 0.5 mixture first: the 1/0 one evaluated after it also shows its adapter was removed
    result = run_cli(["soup", str(a), str(b), "--coef", "0.5,0.5", "--coef", "1,0", "--out", str(out)])
    assert result.code == 0, result.stderr
    one, half = out / "soup-1-0", out / "soup-0.5-0.5"
    # 1/0: the parent's LoRA file content, and the parent's final evaluation, reproduced
    parent_lora, soup_lora = (
        read_lora(a / "checkpoints" / "step-000002"),
        read_lora(one / "checkpoints" / "step-000002"),
    )
    assert all(torch.equal(parent_lora.tensors[k], soup_lora.tensors[k]) for k in parent_lora.tensors)
    final_a, soup_rows = _eval_rows(a)[-1], _eval_rows(one)
    assert [r["step"] for r in soup_rows] == [0, 2]
    assert soup_rows[0] == _eval_rows(a)[0]  # the base model's eval, shared
    for key, value in final_a.items():
        if key.startswith("eval/"):
            assert soup_rows[1][key] == pytest.approx(value, rel=1e-4, abs=5e-6)
    assert (half / "eval" / "step-000002" / "scores.jsonl").is_file()
    soup_info = json.loads((half / "soup.json").read_text())
    assert soup_info["coefficients"] == [0.5, 0.5] and soup_info["names"] == ["a", "b"]

    res = run_pareto([root / "runs", out], tmp_path / "pareto", console=Console(file=open("/dev/null", "w")))
    names = [r.name for r in res.table.runs]
    assert "soup(0.5*a + 0.5*b)" in names and "soup(1*a)" in names
    by_name = {r.name: r for r in res.table.runs}
    assert by_name["soup(0.5*a + 0.5*b)"].strategy == "soup" and by_name["soup(0.5*a + 0.5*b)"].weights == [0.5, 0.5]
    assert res.soups.soup_runs == ["soup(0.5*a + 0.5*b)", "soup(1*a)"]
    assert res.soups.parents == ["a", "b"] and res.soups.sweep_runs == ["a", "b"]
    assert res.paired.runs["soup(0.5*a + 0.5*b)"].n_prompts == 4
    assert "## Soups beside the sweep" in (tmp_path / "pareto" / "report.md").read_text()
    # a second soup into the same folder is refused before anything is written
    result = run_cli(["soup", str(a), str(b), "--coef", "0.3,0.7", "--coef", "1,0", "--out", str(out)])
    assert result.code == 2 and "soup-1-0' exists" in result.stderr
    assert not (out / "soup-0.3-0.7").exists()


def test_a_half_soup_loaded_by_diffusers_applies_the_average_change(parents, tmp_path):
    from apexcli.config import config_from_dict
    from apexcli.models.loading import load_pipeline

    _, (a, b) = parents
    [half] = make_soups([a, b], [[0.5, 0.5]], tmp_path / "soups", evaluate=False)
    cfg = config_from_dict(RunDir(a).read_config())
    pipe = load_pipeline(cfg.model, dtype=torch.float32)
    name = "transformer_blocks.0.attn.to_q"
    base_layer = dict(pipe.transformer.named_modules())[name]
    x = torch.randn(3, base_layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = base_layer(x)
        pipe.load_lora_weights(str(half / "checkpoints" / "step-000002"), weight_name=LORA_FILE)
        soup_out = dict(pipe.transformer.named_modules())[name](x)
    parts = [delta_weights(read_lora(p / "checkpoints" / "step-000002"))[f"transformer.{name}"] for p in (a, b)]
    expected = 0.5 * (parts[0] + parts[1])
    assert expected.abs().max() > 0  # the runs trained: a non-trivial change
    assert torch.allclose((soup_out - base_out).double(), x.double() @ expected.T, atol=1e-5)


def test_a_soups_config_gives_the_rank_and_alpha_of_its_file(tmp_path):
    """config.yaml said the parents' rank 2 / alpha 4 while the file was rank 4 / alpha 8."""
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    half, whole = make_soups([a, b], [[0.5, 0.5], [1.0, 0.0]], tmp_path / "soups", evaluate=False)
    for folder, rank, alpha in ((half, 4, 8), (whole, 2, 4)):
        config = yaml.safe_load((folder / "config.yaml").read_text())
        meta = json.loads(read_lora(folder / "checkpoints" / "step-000002").metadata[META_KEY])
        assert (config["lora"]["rank"], config["lora"]["alpha"]) == (rank, alpha)
        assert (meta["transformer.r"], meta["transformer.lora_alpha"]) == (rank, alpha)


def test_one_run_is_refused_before_any_coefficient(tmp_path):
    """A one-run soup suggested `--coef 1`, a mixture of nothing."""
    a = fake_run(tmp_path, "a")
    for coef in ([], ["1"]):
        with pytest.raises(
            ApexError, match="^apex soup needs two or more runs, got 1: a soup of one run is that run itself"
        ):
            parse_coefficients(coef, 1)
    result = run_cli(["soup", str(a), "--out", str(tmp_path / "soups"), "--no-evaluate"])
    assert result.code == 2 and "two or more runs" in result.stderr and "--coef 1" not in result.stderr


def test_mixtures_that_print_alike_get_their_own_folders(tmp_path):
    """0.3333333 and 0.33333334 named one folder and were reported as "the same --coef twice"."""
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    coefficients = parse_coefficients(["0.3333333,0.6666667", "0.33333334,0.66666666"], 2)
    made = make_soups([a, b], coefficients, tmp_path / "soups", evaluate=False)
    assert [p.name for p in made] == ["soup-0.3333333-0.6666667", "soup-0.33333334-0.66666666"]
    assert [json.loads((p / "soup.json").read_text())["coefficients"] for p in made] == coefficients
    with pytest.raises(ApexError, match=r"^the mixture 0.5,0.5 is given twice \(--coef\)"):
        make_soups([a, b], parse_coefficients(["0.5,0.5", "0.50,0.500"], 2), tmp_path / "more", evaluate=False)
    assert not (tmp_path / "more").exists()


def test_a_parent_with_a_broken_lora_is_refused_by_name(tmp_path):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    broken = lora(0)
    broken.tensors["transformer.blocks.0.attn.to_q.lora_B.weight"][0, 0] = math.nan
    save_file(broken.tensors, str(b / "checkpoints" / "step-000002" / LORA_FILE), metadata=broken.metadata)
    with pytest.raises(ApexError, match="'transformer.blocks.0.attn.to_q.lora_B.weight' holds NaN"):
        make_soups([a, b], [[0.5, 0.5]], tmp_path / "soups", evaluate=False)


def test_out_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = run_cli(["soup", str(a), str(b), "--coef", "0.5,0.5", "--out=~/soups", "--no-evaluate"])
    assert result.code == 0, result.stderr
    assert (tmp_path / "home" / "soups" / "soup-0.5-0.5" / "soup.json").is_file() and not (tmp_path / "~").exists()
