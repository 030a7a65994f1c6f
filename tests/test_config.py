"""Config layering, typed dotted overrides, and errors that name the dotted key."""

from __future__ import annotations

import pytest
import yaml

from apexcli.config import (
    Config,
    config_from_dict,
    config_to_dict,
    parse_override,
    preset_names,
    resolve_config,
    trained_steps,
)
from apexcli.errors import ApexError


def test_every_preset_loads_and_validates():
    assert set(preset_names()) >= {"tiny", "sd35m", "sd35m-1gpu", "sd35l"}
    for name in preset_names():
        cfg = resolve_config(preset=name)
        assert isinstance(cfg, Config)
        assert cfg.preset == name
        total = cfg.train.prompts_per_step * cfg.train.group_size
        assert total % cfg.train.rollout_batch_size == 0 and total % cfg.train.train_batch_size == 0


def test_preset_contents_match_their_promises():
    tiny = resolve_config(preset="tiny")
    assert tiny.model.pretrained == "tiny" and tiny.model.device == "cpu" and tiny.model.dtype == "float32"
    sd35m = resolve_config(preset="sd35m")
    assert sd35m.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert sd35m.model.resolution == 512 and sd35m.sampling.guidance_scale > 1
    one_gpu = resolve_config(preset="sd35m-1gpu")
    # one 80 GB GPU: smaller groups, CFG 4.5 kept, a step window, gradient checkpointing
    assert one_gpu.train.group_size < sd35m.train.group_size
    assert one_gpu.sampling.guidance_scale == 4.5 and one_gpu.eval.guidance_scale == 4.5
    assert 0 < one_gpu.train.window_size < one_gpu.sampling.num_steps - 1
    assert one_gpu.model.gradient_checkpointing
    assert "large" in resolve_config(preset="sd35l").model.pretrained


def test_overrides_are_typed():
    cfg = resolve_config(
        preset="tiny",
        overrides=[
            "train.lr=1e-4",  # YAML 1.1 reads this as a string; the schema makes it a float
            "train.steps=5",
            "train.max_grad_norm=2",  # int literal into a float field
            "objectives=[brightness, contrast]",
            "lora.target_modules=attn.to_q,attn.to_k",  # comma shorthand for a list of strings
            "model.gradient_checkpointing=true",
            "eval.objectives=null",
            "balance.apex.tau=0.5",
        ],
    )
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.train.steps == 5 and type(cfg.train.steps) is int
    assert cfg.train.max_grad_norm == 2.0 and type(cfg.train.max_grad_norm) is float
    assert cfg.objectives == ["brightness", "contrast"]
    assert cfg.lora.target_modules == ["attn.to_q", "attn.to_k"]
    assert cfg.model.gradient_checkpointing is True
    assert cfg.eval.objectives is None
    assert cfg.balance.apex.tau == 0.5


def test_layers_apply_in_order(tmp_path):
    """preset < --config FILE < options < key=value overrides."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  lr: 1.0e-3\n  steps: 7\nseed: 5\n")
    cfg = resolve_config(preset="tiny", config_file=cfg_file, options={"train": {"steps": 9}}, overrides=["seed=6"])
    assert cfg.train.lr == 1e-3  # from the file
    assert cfg.train.steps == 9  # options over the file
    assert cfg.seed == 6  # overrides over the file
    assert cfg.train.group_size == 4  # untouched preset value survives the deep merge


def test_parse_override_nests_dotted_keys():
    assert parse_override("train.lr=1e-4") == {"train": {"lr": "1e-4"}}
    assert parse_override("balance.apex.tau=0.5") == {"balance": {"apex": {"tau": 0.5}}}
    assert parse_override("objectives=[a, b]") == {"objectives": ["a", "b"]}
    with pytest.raises(ApexError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ApexError, match="empty key"):
        parse_override("train..lr=1")


def _error(**kwargs) -> str:
    with pytest.raises(ApexError) as info:
        resolve_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_the_dotted_key_and_suggests():
    msg = _error(preset="tiny", overrides=["train.lrr=1"])
    assert "'train.lrr'" in msg and "train.lr'" in msg
    msg = _error(preset="tiny", overrides=["balance.apex.tua=1"])
    assert "'balance.apex.tua'" in msg and "balance.apex.tau" in msg
    # nothing close: the valid keys are listed instead
    msg = _error(preset="tiny", overrides=["model.zzzzzz=1"])
    assert "'model.zzzzzz'" in msg and "resolution" in msg


def test_bad_type_names_the_key():
    assert "'train.lr'" in _error(preset="tiny", overrides=["train.lr=abc"])
    assert "'train.steps'" in _error(preset="tiny", overrides=["train.steps=1.5"])
    assert "'model.gradient_checkpointing'" in _error(preset="tiny", overrides=["model.gradient_checkpointing=maybe"])
    assert "'train'" in _error(preset="tiny", overrides=["train=3"])
    assert "'objectives[1]'" in _error(preset="tiny", overrides=["objectives=[brightness, [x]]"])
    # NaN would pass every range check (comparisons with NaN are false)
    assert "'train.adv_clip'" in _error(preset="tiny", overrides=["train.adv_clip=.nan"])


def test_batch_divisibility_error_names_the_key():
    # tiny: 2 prompts x 3 samples = 6, which the rollout batch of 8 does not divide
    msg = _error(preset="tiny", overrides=["train.group_size=3"])
    assert "train.rollout_batch_size" in msg and "6" in msg
    msg = _error(preset="tiny", overrides=["train.train_batch_size=3"])
    assert "train.train_batch_size" in msg and "8" in msg
    assert "train.group_size" in _error(preset="tiny", overrides=["train.group_size=1"])


def test_semantic_checks_name_the_key():
    assert "model.resolution" in _error(preset="tiny", overrides=["model.resolution=30"])
    assert "train.window_size" in _error(preset="tiny", overrides=["train.window_size=9"])
    assert "sampling.sampler" in _error(preset="tiny", overrides=["sampling.sampler=euler"])
    assert "balance.strategy" in _error(preset="tiny", overrides=["balance.strategy=foo"])
    assert "balance.weights" in _error(preset="tiny", overrides=["balance.weights=[1, 2, 3]"])
    assert "objectives" in _error(preset="tiny", overrides=["objectives=[brightness, brightness]"])
    assert "nosuch" in _error(preset="nosuch")


def test_config_file_errors(tmp_path):
    assert "does not exist" in _error(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "not valid YAML" in _error(config_file=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert "mapping" in _error(config_file=listy)


def test_resolved_config_round_trips_through_yaml():
    cfg = resolve_config(preset="sd35m-1gpu", overrides=["train.lr=2e-4", "balance.weights=[1, 2, 1, 1]"])
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_trained_steps_window():
    # default: every step but the last (tiny-sigma) one
    assert trained_steps(resolve_config(preset="tiny")) == [0, 1, 2, 3, 4]
    cfg = resolve_config(preset="tiny", overrides=["train.window_start=1", "train.window_size=2"])
    assert trained_steps(cfg) == [1, 2]


def test_run_dir_gets_config_and_command(tiny_run):
    written = yaml.safe_load((tiny_run / "config.yaml").read_text())
    cfg = config_from_dict(written)  # the file is a complete, loadable config
    assert cfg.objectives == ["brightness", "colorfulness"]
    assert cfg.train.steps == 3 and cfg.train.group_size == 2 and cfg.model.resolution == 32
    assert cfg.out == str(tiny_run)
    command = (tiny_run / "command.txt").read_text().splitlines()
    assert len(command) == 1 and command[0].startswith("apex")
    assert "--objectives brightness,colorfulness" in command[0] and "train.group_size=2" in command[0]
