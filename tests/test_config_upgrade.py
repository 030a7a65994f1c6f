"""Presets that inherit (``base:``), and keys of older versions: a saved run config that holds them
loads as today's keys; anywhere else each is a one-line error naming what replaced it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import apexcli.config as config_module
from apexcli.config import config_from_dict, config_to_dict, load_preset, resolve_config
from apexcli.config_upgrade import OLD_KEYS, upgrade_config
from apexcli.errors import ApexError

OLD_RUN_CONFIG = Path(__file__).parent / "data" / "run_config_0.1.yaml"
"""``config.yaml`` as apex 0.1.0 wrote it: ``--preset mini`` with ``objectives=[adherence, quality,
appeal, ocr] rewards.ocr.url=http://127.0.0.1:18086 balance.apex.terms=lp,pn balance.apex.dsan=false
train.gradient_accumulation=1 sampling.noise_block=2``."""


def _old_run_config() -> dict:
    return yaml.safe_load(OLD_RUN_CONFIG.read_text(encoding="utf-8"))


def _error(**kwargs) -> str:
    with pytest.raises(ApexError) as info:
        resolve_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- base: inheritance
@pytest.fixture
def presets(tmp_path, monkeypatch):
    """A preset folder of the test's own (``write(name, yaml_text)``)."""
    monkeypatch.setattr(config_module, "preset_files", lambda: tmp_path)

    def write(name: str, text: str) -> None:
        (tmp_path / f"{name}.yaml").write_text(text, encoding="utf-8")

    return write


def test_a_preset_inherits_its_base_recursively(presets):
    presets("root", "seed: 1\ntrain:\n  lr: 0.5\n  steps: 10\nlora:\n  rank: 4\n")
    presets("middle", "base: root\ntrain:\n  steps: 20\n")
    presets("leaf", "base: middle\nlora:\n  rank: 8\n")
    data = load_preset("leaf")
    assert data == {"seed": 1, "train": {"lr": 0.5, "steps": 20}, "lora": {"rank": 8}, "preset": "leaf"}
    cfg = resolve_config(preset="leaf", overrides=["train.steps=30"])
    assert (cfg.seed, cfg.train.lr, cfg.train.steps, cfg.lora.rank, cfg.preset) == (1, 0.5, 30, 8, "leaf")


def test_a_cycle_or_an_unknown_base_is_an_error(presets):
    presets("a", "base: b\n")
    presets("b", "base: a\n")
    presets("self", "base: self\n")
    presets("orphan", "base: nosuch\n")
    assert "preset 'a' inherits from itself: a -> b -> a" in _error(preset="a")
    assert "self -> self" in _error(preset="self")
    message = _error(preset="orphan")
    assert "preset 'orphan' has base: nosuch, which is not a preset" in message and "valid:" in message
    presets("empty", "base: ''\n")
    assert "preset 'empty' has base: ''" in _error(preset="empty")


def test_the_sd35_presets_hold_only_their_differences():
    """sd35m is the defaults; the other two inherit it and change a few keys."""
    sd35m = resolve_config(preset="sd35m")
    for name, changed in (("sd35m-1gpu", {"model", "train", "eval"}), ("sd35l", {"model", "train", "eval"})):
        text = (Path(config_module.__file__).parent / "presets" / f"{name}.yaml").read_text(encoding="utf-8")
        assert "\nbase: sd35m\n" in text
        cfg = resolve_config(preset=name)
        for section in ("lora", "sampling", "balance", "rewards", "prompts"):
            assert getattr(cfg, section) == getattr(sd35m, section), (name, section)
        assert {s for s in changed if getattr(cfg, s) != getattr(sd35m, s)} == changed
        assert cfg.train.kl_form == "reference" and cfg.train.optimizer_steps_per_epoch == 2


PRESETS_0_1 = Path(__file__).parent / "data" / "presets_0.1.json"
"""Every preset's resolved config as apex 0.1.0 wrote it (``config_to_dict(resolve_config(preset=P))``)."""

# what the recipe defaults changed on purpose; the same training wherever they differ
# (ceil(0.99 n) = n trained steps for n <= 100; mini's EMA is off)
CHANGED_ON_PURPOSE = {
    "mini": {"train.timestep_fraction": (1.0, 0.99), "train.ema_every": (1, 8), "train.ema_warmup": (False, True)},
    "sd35m-1gpu": {"train.timestep_fraction": (1.0, 0.99)},
    "tiny": {"train.timestep_fraction": (1.0, 0.99)},
}


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("preset", ["mini", "sd35l", "sd35m", "sd35m-1gpu", "tiny"])
def test_every_preset_resolves_to_the_config_it_did_before(preset):
    old = config_to_dict(config_from_dict(json.loads(PRESETS_0_1.read_text(encoding="utf-8"))[preset]))
    now = config_to_dict(resolve_config(preset=preset))
    a, b = _flat(old), _flat(now)
    assert a.keys() == b.keys()
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == CHANGED_ON_PURPOSE.get(preset, {})


# ----------------------------------------------------------------------------- old keys
def test_an_old_run_config_loads_as_todays_keys():
    cfg = config_from_dict(_old_run_config())
    # train.gradient_accumulation=1 with 2 micro-batches of 8 (2 prompts x 8): 2 optimizer steps
    assert cfg.train.optimizer_steps_per_epoch == 2
    # balance.apex.terms=lp,pn: cp's coefficient 0; dsan=false: no floor
    assert (cfg.balance.apex.b_lp, cfg.balance.apex.b_cp, cfg.balance.apex.b_pn) == (1.0, 0.0, 1.0)
    assert cfg.balance.apex.rho == 0
    # the strategy's own eps and dropping (apex: 1e-6, keep A = 0 samples), as the run had them
    assert cfg.balance.eps is None and cfg.balance.drop_zero_advantage is None
    # rewards.ocr.url: the objective names its server
    assert cfg.objectives == ["adherence", "quality", "appeal", "ocr@http://127.0.0.1:18086"]
    # the rest of the run is as it was written
    assert cfg.preset == "mini" and cfg.train.loss == "nft" and cfg.train.kl_form == "exact"
    assert cfg.lora.init == "kaiming" and cfg.model.max_sequence_length == 48 and cfg.train.ema_decay == 0
    # what the run wrote is what it loads, written back with today's keys
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg


def test_research_settings_of_an_old_run_load_from_their_experimental_sections():
    cfg = config_from_dict(_old_run_config())
    assert cfg.sampling.experimental.noise_block == 2
    assert cfg.train.experimental.nft_timesteps == 4 and cfg.train.experimental.anchor_beta == 0
    assert cfg.balance.experimental.progress_prompts == 16


def test_a_removed_setting_of_an_old_run_is_noted_and_dropped():
    data = _old_run_config()
    assert upgrade_config(data)[1] == []  # not_on_text [] and the symmetric conflict: what remains
    data["balance"]["not_on_text"] = ["quality", "appeal"]
    data["balance"]["apex"]["conflict"] = "leader_yields"
    upgraded, notes = upgrade_config(data)
    assert notes == [
        "balance.not_on_text=['quality', 'appeal'] is no longer a setting: ignored",
        "balance.apex.conflict='leader_yields' is no longer a setting: ignored",
    ]
    assert "not_on_text" not in upgraded["balance"] and "conflict" not in upgraded["balance"]["apex"]
    config_from_dict(data)  # apex eval / soup / pareto still read the run


def test_a_resume_from_an_old_checkpoint_compares_todays_keys(capsys):
    from apexcli.train.run_start import check_resume_config

    data = _old_run_config()
    data["balance"]["not_on_text"] = ["quality"]
    cfg = config_from_dict(_old_run_config())
    cfg.train.experimental.nft_timesteps = 2
    applied = check_resume_config("ckpt", data, cfg, verbose=False)
    assert applied == [
        "balance.not_on_text=['quality'] is no longer a setting: ignored",
        "train.experimental.nft_timesteps: 4 -> 2",
    ]


def test_the_pairs_that_said_one_thing_carry_over_as_the_key_that_stays():
    def balance(**section) -> dict:
        return upgrade_config({"balance": section})[0]["balance"]

    # static had its own eps and switch; at their defaults they are the strategy's own (null)
    assert balance(strategy="static", eps=1e-6, static={"eps": 1e-4, "drop_zero_advantage": True}) == {
        "strategy": "static",
        "eps": None,
        "static": {},
    }
    assert balance(strategy="static", eps=1e-6, static={"eps": 1e-3, "drop_zero_advantage": False}) == {
        "strategy": "static",
        "eps": 1e-3,
        "drop_zero_advantage": False,
        "static": {},
    }
    # another strategy never read static's: its eps stays, null when it was the default
    assert balance(strategy="gdpo", eps=1e-5, static={"eps": 1e-3}) == {"strategy": "gdpo", "eps": 1e-5, "static": {}}
    assert balance(strategy="pareto", pareto={"drop_filtered": False}) == {
        "strategy": "pareto",
        "pareto": {},
        "drop_zero_advantage": False,
    }
    assert balance(strategy="apex", pareto={"drop_filtered": False}) == {"strategy": "apex", "pareto": {}}
    assert balance(apex={"terms": "", "dsan": True}) == {"apex": {"b_lp": 0.0, "b_cp": 0.0, "b_pn": 0.0}}
    assert upgrade_config({"balance": {"apex": {"terms": "lp,xx"}}})[1] == [
        "balance.apex.terms='lp,xx' could not be carried over (unknown term 'xx'): set balance.apex.b_lp, b_cp, b_pn"
    ]


def test_a_reward_url_moves_into_the_objectives_that_name_it():
    data = {
        "objectives": ["pickscore", "ocr", "deqa@http://b:2"],
        "eval": {"objectives": ["pick", "aes"]},
        "rewards": {
            "pick": {"url": "http://a:1", "batch_size": 4},
            "deqa": {"url": "http://c:3"},
            "extra": {"redness": {"url": ""}},
        },
    }
    upgraded, notes = upgrade_config(data)
    assert upgraded["objectives"] == ["pickscore@http://a:1", "ocr", "deqa@http://b:2"]  # an explicit @ won
    assert upgraded["eval"]["objectives"] == ["pick@http://a:1", "aes"]
    assert upgraded["rewards"] == {"pick": {"batch_size": 4}, "deqa": {}, "extra": {}}
    assert notes == []
    # a file without objectives: where the server applied is unknown, so it is said
    assert upgrade_config({"rewards": {"deqa": {"url": "http://c:3"}}})[1] == [
        "rewards.deqa.url='http://c:3' could not be carried over: write deqa@http://c:3 in objectives"
    ]


def test_gradient_accumulation_carries_over_as_optimizer_steps():
    def steps(**train) -> int:
        return config_from_dict({"train": train}).train.optimizer_steps_per_epoch

    assert steps(gradient_accumulation=0, optimizer_steps_per_epoch=0) == 1  # all micro-batches: one step
    # 16 samples in micro-batches of 2 = 8; 3 per step -> 3 steps (3, 3, 2)
    assert (
        steps(
            gradient_accumulation=3, optimizer_steps_per_epoch=0, prompts_per_step=2, group_size=8, train_batch_size=2
        )
        == 3
    )
    assert steps(gradient_accumulation=0, optimizer_steps_per_epoch=2) == 2  # the steps were set: they stay


def test_a_config_file_may_be_an_old_run_config(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(OLD_RUN_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = resolve_config(config_file=path, overrides=["train.steps=61"])
    assert cfg.train.optimizer_steps_per_epoch == 2 and cfg.train.steps == 61


@pytest.mark.parametrize("entry", OLD_KEYS, ids=lambda e: e.key)
def test_every_old_key_given_as_a_setting_is_a_one_line_error(entry):
    key = entry.key.replace("*", "redness")
    message = _error(preset="tiny", overrides=[f"{key}=1"])
    assert message.startswith(f"config key '{key}' ") and message.endswith(entry.instead), message
    assert "was removed" in message or "was replaced by" in message or "is now" in message, message


def test_an_old_key_in_a_preset_or_an_option_is_an_error_too(presets):
    presets("old", "train:\n  gradient_accumulation: 2\n")
    message = _error(preset="old")
    assert (
        "config key 'train.gradient_accumulation' (in preset old) was replaced by train.optimizer_steps_per_epoch"
        in message
    )
    message = _error(options={"train": {"gradient_accumulation": 2}})
    assert "'train.gradient_accumulation' was replaced by" in message


def test_a_key_no_version_had_still_fails_with_its_name():
    data = _old_run_config()
    data["train"]["nosuch"] = 1
    with pytest.raises(ApexError, match=r"unknown config key 'train.nosuch'"):
        config_from_dict(data)


def test_upgrading_leaves_the_input_alone_and_a_current_config_unchanged():
    old = _old_run_config()
    before = yaml.safe_dump(old)
    upgrade_config(old)
    assert yaml.safe_dump(old) == before
    current = config_to_dict(resolve_config(preset="mini"))
    assert upgrade_config(current) == (current, [])
