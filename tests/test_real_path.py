"""Defects that only real shapes and real devices show, each pinned by a check that failed before its fix.

(The text-cache digest past 2^24 elements is checked in ``test_text_cache.py``.) The end-to-end runs of the SD3.5 presets on real-shape fixtures are in ``test_real_shape.py``
(marked slow); these are the fast, targeted checks.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from apexcli.config import resolve_config
from apexcli.errors import ApexError
from apexcli.models.text_cache import encode_prompts
from apexcli.train.trainer import Trainer, _check_shards
from helpers import tiny_overrides


class _DeviceTrackingPipe:
    """Stands in for an SD3 pipeline whose encoders sit on another device than the one the
    embeddings are wanted on: records where ``encode_prompt`` was asked to put the token ids."""

    def __init__(self, encoder_device: str):
        self.text_encoder = torch.nn.Linear(1, 1, device=encoder_device)
        self.text_encoder_2 = self.text_encoder_3 = None
        self.asked: list[torch.device] = []

    def encode_prompt(self, *, prompt, device, max_sequence_length, **_):
        self.asked.append(torch.device(device))
        n = len(prompt)
        return torch.zeros(n, 4, 8, device=device), None, torch.zeros(n, 8, device=device), None


def test_prompts_are_encoded_on_the_encoders_device_whatever_device_the_embeddings_go_to():
    # the trainer moves the encoders to the GPU and keeps the embeddings on the CPU: encoding
    # with device="cpu" would feed CPU token ids to GPU encoders (here: the meta device)
    pipe = _DeviceTrackingPipe("meta")
    with pytest.raises(NotImplementedError):  # meta tensors cannot be copied to the CPU at the end
        encode_prompts(pipe, ["a cat"], max_sequence_length=8, device="cpu")
    assert pipe.asked == [torch.device("meta")]
    pipe = _DeviceTrackingPipe("cpu")
    out = encode_prompts(pipe, ["a cat", "a dog"], max_sequence_length=8, device="meta")
    assert pipe.asked == [torch.device("cpu")] and out.prompt_embeds.device.type == "meta"


def _setup_trainer(tmp_path, *extra: str) -> Trainer:
    cfg = resolve_config(preset="tiny", overrides=tiny_overrides(**{"out": str(tmp_path / "run")}) + list(extra))
    trainer = Trainer(cfg, argv=["apex", "train"])
    return trainer


def test_one_reward_suite_serves_training_eval_and_the_progress_probe(tmp_path):
    trainer = _setup_trainer(
        tmp_path,
        "eval.every=1",
        "eval.num_prompts=2",
        "balance.strategy=apex",
        "balance.experimental.progress_prompts=2",
        "balance.probe_every=1",
    )
    try:
        trainer.setup()
        assert trainer.progress_probe is not None and trainer.evaluator is not None
        for name, reward in trainer.suite.rewards.items():
            assert trainer.evaluator.suite.rewards[name] is reward
            assert trainer.progress_probe.suite.rewards[name] is reward
    finally:
        trainer.close()


def test_eval_only_objectives_join_the_shared_suite(tmp_path):
    trainer = _setup_trainer(tmp_path, "eval.every=1", "eval.num_prompts=2", "eval.objectives=[contrast,brightness]")
    try:
        trainer.setup()
        assert trainer.evaluator.suite.objectives == ["contrast", "brightness"]
        assert trainer.evaluator.suite.rewards["brightness"] is trainer.suite.rewards["brightness"]
        assert "contrast" not in trainer.suite.objectives
    finally:
        trainer.close()


def test_freed_text_encoders_are_released_when_freed(tmp_path, monkeypatch):
    # the memory is only given back if nothing else holds the encoders at that moment (a loop
    # variable in set-up once kept T5, 9.5 GB in bf16, alive through the empty_cache() call)
    import apexcli.train.setup as setup_module

    refs: list[weakref.ref] = []
    alive_after_free: list[int] = []
    load, free = setup_module.load_pipeline, setup_module.free_text_encoders

    def load_and_watch(*args, **kwargs):
        pipe = load(*args, **kwargs)
        refs.extend(weakref.ref(e) for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
        return pipe

    def free_and_count(pipe):
        free(pipe)
        gc.collect()
        alive_after_free.append(sum(r() is not None for r in refs))

    monkeypatch.setattr(setup_module, "load_pipeline", load_and_watch)
    monkeypatch.setattr(setup_module, "free_text_encoders", free_and_count)
    trainer = _setup_trainer(tmp_path, "model.free_text_encoders=true", "eval.every=1", "eval.num_prompts=2")
    try:
        trainer.setup()
    finally:
        trainer.close()
    assert len(refs) == 3 and alive_after_free == [0], "a text encoder was still referenced when it was freed"


def test_optimizer_steps_per_epoch_does_not_change_with_the_number_of_processes():
    # sd35m-1gpu: 4 prompts x 8 = 32 samples, micro-batches of 4, two optimizer steps per epoch
    cfg = resolve_config(preset="sd35m-1gpu")
    assert "2 optimizer step(s)" in _check_shards(cfg, 1)
    assert "4 processes" in _check_shards(cfg, 4)  # 8 samples = 2 micro-batches each: still two steps
    with pytest.raises(ApexError, match=r"optimizer_steps_per_epoch=2 .* set train.train_batch_size=2"):
        _check_shards(cfg, 8)  # one micro-batch per process could make only one step


def test_the_run_layout_and_the_ema_delay_are_printed_at_start(tmp_path, capsys):
    trainer = _setup_trainer(
        tmp_path,
        "eval.every=1",
        "eval.num_prompts=2",
        "train.ema_decay=0.9",
        "train.ema_every=8",
        "train.optimizer_steps_per_epoch=2",
    )
    try:
        trainer.setup()
    finally:
        trainer.close()
    err = capsys.readouterr().err
    assert "apex: one process; 4 samples per update = 4 per process in 2 micro-batch(es) of 2" in err
    assert "evaluations before update 4 show the base model" in err


def test_the_experimental_settings_a_run_makes_are_one_warning_at_start(tmp_path, capsys):
    trainer = _setup_trainer(
        tmp_path,
        "train.loss=nft",
        "train.experimental.nft_timesteps=2",
        "sampling.experimental.noise_block=2",
        "train.experimental.nft_beta=1.0",
    )
    try:
        trainer.setup()
    finally:
        trainer.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "experimental" in line]
    # nft_beta is set to its default: not a change, not listed
    assert lines == [
        "warning: experimental settings: train.loss=nft, sampling.experimental.noise_block=2, "
        "train.experimental.nft_timesteps=2 (docs/method/extensions.md)"
    ]
    trainer = _setup_trainer(tmp_path / "plain")
    try:
        trainer.setup()
    finally:
        trainer.close()
    assert "experimental" not in capsys.readouterr().err


def test_a_single_process_accelerate_launch_asked_for_several_says_so(tmp_path, capsys, monkeypatch):
    # what `accelerate launch --num_processes 2` without --multi_gpu leaves in the environment
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer = _setup_trainer(tmp_path)
    try:
        trainer.setup()
    finally:
        trainer.close()
    assert "started a single process although it was asked for several; add --multi_gpu" in capsys.readouterr().err
