"""Every config field is checked at config time against the rule declared beside it
(``setting(...)``), and the error names the dotted key: no traceback after the model loads."""

from __future__ import annotations

import dataclasses

import pytest

from apexcli.config import Config, resolve_config
from apexcli.errors import ApexError
from apexcli.schema import Rule, check_fields, iter_fields, setting
from helpers import run_cli


def _error(*overrides: str) -> str:
    with pytest.raises(ApexError) as info:
        resolve_config(preset="tiny", overrides=list(overrides))
    return str(info.value)


# each was accepted, or crashed with a traceback after the model loaded
@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.lr=inf", "train.lr", "finite"),
        ("train.lr=-1", "train.lr", "> 0"),
        ("sampling.guidance_scale=inf", "sampling.guidance_scale", "finite"),
        ("train.kl_beta=inf", "train.kl_beta", "finite"),
        ("train.adam_beta1=2", "train.adam_beta1", "[0, 1)"),
        ("train.adam_eps=-1", "train.adam_eps", "> 0"),
        ("lora.dropout=2", "lora.dropout", "[0, 1)"),
        ("seed=-1", "seed", "got -1"),
        ("lora.target_modules=[]", "lora.target_modules", "empty"),
        ("eval.batch_size=0", "eval.batch_size", ">= 1"),
        ("model.max_sequence_length=0", "model.max_sequence_length", "in [1, 512], got 0"),
        ("eval.seed=-3", "eval.seed", "got -3"),
        ("train.max_grad_norm=-inf", "train.max_grad_norm", "finite"),
        ("balance.apex.tau=inf", "balance.apex.tau", "finite"),
        ("rewards.toy.jpeg_quality=0", "rewards.toy.jpeg_quality", "[1, 100]"),
        ("rewards.ocr.workers=0", "rewards.ocr.workers", "[1, 64]"),
        ("model.dtype=float64", "model.dtype", "float32"),
        ("eval.objectives=[]", "eval.objectives", "empty"),
        # sizes that can only be a mistake, or fail once the model has loaded
        ("model.resolution=8192", "model.resolution", "in [16, 4096], got 8192"),
        ("model.max_sequence_length=1024", "model.max_sequence_length", "in [1, 512], got 1024"),
        ("lora.rank=4096", "lora.rank", "in [1, 1024], got 4096"),
        ("sampling.num_steps=5000", "sampling.num_steps", "in [2, 1000], got 5000"),
        ("eval.num_steps=5000", "eval.num_steps", "in [1, 1000], got 5000"),
        ("train.group_size=2048", "train.group_size", "in [2, 1024], got 2048"),
        ("train.prompts_per_step=10000", "train.prompts_per_step", "in [1, 4096], got 10000"),
        # the balance section: the same rules, the same error
        ("balance.apex.rho=-1", "balance.apex.rho", ">= 0, got -1"),
        ("balance.apex.b_cp=-1", "balance.apex.b_cp", ">= 0, got -1"),
        ("balance.mgda.iterations=0", "balance.mgda.iterations", ">= 1, got 0"),
        ("balance.std_scope=batch", "balance.std_scope", "one of global, group"),
        ("balance.weights=[1, -1]", "balance.weights", ">= 0, got -1"),
        ("balance.experimental.progress_prompts=-1", "balance.experimental.progress_prompts", ">= 0, got -1"),
        ("rewards.remote.timeout_s=0", "rewards.remote.timeout_s", "> 0, got 0"),
    ],
)
def test_bad_values_name_the_dotted_key(override, key, expected):
    message = _error(override)
    assert f"'{key}'" in message and expected in message, message


def test_block_noise_needs_the_sde_sampler():
    message = _error("sampling.experimental.noise_block=4", "sampling.sampler=cps")
    assert "'sampling.experimental.noise_block'" in message and "sampler=sde" in message, message
    assert _error("sampling.experimental.noise_block=0").count("'sampling.experimental.noise_block'") == 1
    cfg = resolve_config(preset="tiny", overrides=["sampling.experimental.noise_block=4"])
    assert cfg.sampling.experimental.noise_block == 4


def test_nft_loss_settings():
    message = _error("train.loss=nft", "train.experimental.anchor_beta=1.0")
    assert "'train.experimental.anchor_beta'" in message and "train.experimental.anchor_beta=0" in message, message
    message = _error("train.loss=nft", "train.experimental.nft_timesteps=9", "sampling.num_steps=3")
    assert "'train.experimental.nft_timesteps'" in message and "<=3" in message, message
    assert "'train.loss'" in _error("train.loss=dpo")
    cfg = resolve_config(preset="mini", overrides=["train.loss=nft", "train.experimental.anchor_beta=0"])
    assert cfg.train.loss == "nft" and cfg.train.experimental.nft_adv_scale == cfg.train.adv_clip


def test_rules_are_declared_beside_the_fields():
    rules = {key: rule for key, _, rule in iter_fields(Config())}
    assert rules["train.lr"] == Rule(gt=0)
    assert rules["balance.apex.tau"] == Rule(gt=0) and rules["balance.apex.floor"] == Rule(ge=0, le=1)
    assert rules["balance.strategy"].choices and rules["balance.std_scope"].choices == ("global", "group")
    assert rules["lora.rank"].resume == "refuse" and rules["train.lr"].resume == "apply"
    # the defaults obey their own rules
    check_fields(Config())


def test_the_rules_that_relate_balance_fields_read_like_the_others():
    """Weights and targets against the objectives, the progress probe against its period: the
    same one-line format, from the run config and from build_balancer alike."""
    message = _error("balance.weights=[1, 2, 3]")
    assert message == (
        "config key 'balance.weights' has 3 values but there are 2 objectives; give one weight per objective"
    )
    assert "config key 'balance.weights' must not all be 0" in _error(
        "balance.weights=[0, 0]", "balance.strategy=static"
    )
    assert "config key 'balance.apex.targets' has 1 values" in _error("balance.apex.targets=[1]")
    message = _error("balance.experimental.progress_prompts=2", "balance.probe_every=0")
    assert message.startswith("config key 'balance.experimental.progress_prompts' needs balance.probe_every > 0")


def test_a_new_field_joins_with_one_line():
    @dataclasses.dataclass
    class Section:
        scale: float = setting(1.0, gt=0, le=10)
        """A documented field."""
        mode: str = setting("a", choices=("a", "b"))
        """Another."""

    check_fields(Section())
    with pytest.raises(ApexError, match=r"'x\.scale' must be in \(0, 10\], got 11"):
        check_fields(Section(scale=11), "x.")
    with pytest.raises(ApexError, match=r"'x\.mode' must be one of a, b, got 'c'"):
        check_fields(Section(mode="c"), "x.")
    with pytest.raises(ValueError):
        setting(1, resume="sometimes")


def test_cli_errors_are_one_line_before_any_model_loads(tmp_path):
    result = run_cli(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "train.adam_beta1=2"])
    assert result.code == 2 and "train.adam_beta1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()
    result = run_cli(["sample", "--preset", "tiny", "--prompt", "x", "--guidance", "inf", "--out", str(tmp_path / "s")])
    assert result.code == 2 and "--guidance" in result.stderr and "finite" in result.stderr
    assert not (tmp_path / "s" / "metadata.jsonl").exists()


def test_resume_policy_compares_what_matters():
    from apexcli.config import config_to_dict
    from apexcli.train.run_start import check_resume_config

    cfg = resolve_config(preset="tiny", overrides=["objectives=[brightness, deqa@http://127.0.0.1:1]"])
    saved = config_to_dict(cfg)
    saved["objectives"] = ["brightness", "deqa@http://127.0.0.1:2"]  # the server moved: same rewards
    saved["train"]["lr"] = 0.5
    assert check_resume_config("ckpt", saved, cfg, verbose=False) == [
        "objectives: ['brightness', 'deqa@http://127.0.0.1:2'] -> ['brightness', 'deqa@http://127.0.0.1:1']",
        "train.lr: 0.5 -> 0.01",
    ]
    for key, value in (
        ("objectives", ["brightness"]),
        ("balance.strategy", "static"),
        ("lora.target_modules", ["attn.to_q"]),
    ):
        changed = config_to_dict(cfg)
        section, _, name = key.rpartition(".")
        (changed[section] if section else changed)[name] = value
        with pytest.raises(ApexError, match=rf"cannot resume from ckpt with these changes: {key}:"):
            check_resume_config("ckpt", changed, cfg, verbose=False)
