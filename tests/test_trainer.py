"""The GRPO trainer on the tiny pipeline (CPU): on-policy invariants, metrics, saved LoRA."""

from __future__ import annotations

import pytest
import torch

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.config import resolve_config
from apexcli.errors import ApexError
from apexcli.flow.rollout import step_log_prob, unwrap_model
from apexcli.flow.sde import gaussian_kl
from apexcli.models.lora import attach_lora, load_lora_into_adapter
from apexcli.models.tiny import build_tiny_pipeline
from apexcli.train.sampler import plan_step
from apexcli.train.trainer import Trainer, _check_shards
from helpers import TINY_OVERRIDES, load_lora_file, read_metrics, train_tiny

OBJECTIVES = ["brightness", "colorfulness"]
ROW_KEYS = [
    "step",
    "loss",
    "kl",
    "ratio_mean",
    "clip_frac",
    "lr",
    "grad_norm",
    "time/sample",
    "time/score",
    "time/train",
]


def _row_keys() -> list[str]:
    keys = list(ROW_KEYS)
    for k in OBJECTIVES:
        keys += [f"reward/{k}/mean", f"reward/{k}/std", f"balance/weight/{k}"]
    return keys


def test_first_update_is_on_policy(tmp_path):
    """Recomputed log-probs equal the rollout's (ratio 1) and the KL to the base is 0 before any update."""
    cfg = resolve_config(
        preset="tiny", options={"out": str(tmp_path / "run"), "objectives": OBJECTIVES}, overrides=TINY_OVERRIDES
    )
    trainer = Trainer(cfg, argv=["test"])
    try:
        trainer.setup()
        plan = plan_step(
            step=1,
            seed=cfg.seed,
            num_prompts=len(trainer.prompts),
            prompts_per_step=2,
            group_size=2,
            rank=0,
            world_size=1,
        )
        trainer.step = 1
        trainer.transformer.eval()
        trajectories, rewards, _ = trainer._sample(plan)
        assert rewards.shape == (4, 2) and torch.isfinite(rewards).all()
        trainer.transformer.train()
        model = unwrap_model(trainer.transformer)
        for b, traj in enumerate(trajectories):
            assert traj.sde_mask.tolist() == [True, True, False]  # window: all but the last step
            cond = trainer.embeds.index([plan.prompt_ids[2 * b + i] for i in range(len(traj))])
            for t in trainer.steps_trained:
                x, x_next, sigma, sigma_next = traj.transition(t)
                # per-sample sigmas, as the trainer draws them
                sig = torch.full((len(traj),), sigma)
                sig_next = torch.full((len(traj),), sigma_next)
                with torch.no_grad():
                    out = step_log_prob(
                        trainer.transformer,
                        x,
                        x_next,
                        sig,
                        sig_next,
                        cond,
                        **traj.step_options,
                    )
                    model.disable_adapters()
                    ref = step_log_prob(
                        model,
                        x,
                        x_next,
                        sig,
                        sig_next,
                        cond,
                        **traj.step_options,
                    )
                    model.enable_adapters()
                ratio = torch.exp(out.log_prob - traj.log_probs[:, t])
                assert (ratio - 1).abs().max() < 1e-5
                assert torch.all(gaussian_kl(out.mean, ref.mean, out.std) == 0)
        # the trainer's own bookkeeping of the same invariant
        row = trainer.train_step()
        assert abs(row["ratio_first"] - 1) < 1e-5
        assert abs(row["ratio_mean"] - 1) < 1e-5 and row["clip_frac"] == 0.0
        assert row["kl"] == 0.0
        assert row["grad_norm"] > 0
    finally:
        trainer.close()


def test_metrics_rows(tiny_run):
    rows = read_metrics(tiny_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        missing = [k for k in _row_keys() if k not in row]
        assert not missing, missing
        assert row["kind"] == "train"
        for key in _row_keys():
            assert isinstance(row[key], (int, float)), (key, row[key])
        assert row["lr"] == 1e-2  # the tiny preset's train.lr
        assert row["time/sample"] > 0 and row["time/train"] > 0 and row["time/score"] >= 0
        assert 0 <= row["reward/brightness/mean"] <= 1
        assert row["reward/colorfulness/std"] >= 0
        assert abs(row["balance/weight/brightness"] + row["balance/weight/colorfulness"] - 2) < 1e-6
    assert rows[0]["kl"] == 0.0 and abs(rows[0]["ratio_first"] - 1) < 1e-5
    # after the first update the policy has left the base model
    assert rows[1]["kl"] > 0 and rows[2]["kl"] > 0


def test_checkpoint_layout(tiny_run):
    ckpt = tiny_run / "checkpoints" / "step-000003"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file()
    assert (ckpt / "config.yaml").is_file()
    for name in ("optimizer.pt", "balancer.pt", "trainer.pt"):
        assert (ckpt / "state" / name).is_file()
    # checkpoint_every=10 in tiny: only the final step is saved; no temp dirs remain
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == ["step-000003"]


def test_training_changes_the_lora_weights(tiny_run):
    trained = load_lora_file(tiny_run / "checkpoints" / "step-000003")
    # the initial adapter: same seed, rank and targets as the run (B = 0)
    transformer = build_tiny_pipeline().transformer
    attach_lora(transformer, rank=4, alpha=8, dropout=0.0, target_modules=list(JOINT_ATTENTION_PROJECTIONS), seed=42)
    initial = {
        f"transformer.{k.replace('.default', '')}": v for k, v in transformer.state_dict().items() if "lora_" in k
    }
    assert initial.keys() == trained.keys()
    b_keys = [k for k in trained if "lora_B" in k]
    a_keys = [k for k in trained if "lora_A" in k]
    assert all(torch.count_nonzero(initial[k]) == 0 for k in b_keys)
    assert sum(int(torch.count_nonzero(trained[k])) for k in b_keys) > 0
    assert all(trained[k].abs().max() < 1.0 for k in trained)  # lr 1e-2 x 3 Adam steps: small moves
    assert any(not torch.equal(trained[k], initial[k]) for k in a_keys)


def test_saved_lora_loads_into_the_diffusers_pipeline(tiny_run):
    ckpt = tiny_run / "checkpoints" / "step-000003"
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 16, 16, generator=gen),
        timestep=torch.tensor([700.0, 300.0]),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=gen),
        pooled_projections=torch.randn(2, 64, generator=gen),
        return_dict=False,
    )
    pipe = build_tiny_pipeline()
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(ckpt), weight_name="pytorch_lora_weights.safetensors")
        loaded = pipe.transformer(**inputs)[0]
    assert (loaded - base).abs().max() > 1e-5
    # and it is the policy the trainer had: the adapter restored as resume does
    transformer = build_tiny_pipeline().transformer
    attach_lora(transformer, rank=4, alpha=8, dropout=0.0, target_modules=list(JOINT_ATTENTION_PROJECTIONS), seed=0)
    load_lora_into_adapter(transformer, ckpt)
    with torch.no_grad():
        policy = transformer(**inputs)[0]
    torch.testing.assert_close(loaded, policy, rtol=1e-5, atol=1e-6)


def test_every_process_gets_whole_micro_batches():
    """4 samples on 2 processes leave 2 each: a train batch of 4 would silently train nothing."""
    cfg = resolve_config(preset="tiny", overrides=TINY_OVERRIDES + ["train.train_batch_size=4"])
    _check_shards(cfg, 1)  # one process: 4 samples, one micro-batch
    with pytest.raises(
        ApexError, match=r"'train.train_batch_size' \(4\) must divide the samples per process \(4 / 2 processes = 2\)"
    ):
        _check_shards(cfg, 2)
    with pytest.raises(ApexError, match="number of processes"):
        _check_shards(cfg, 3)


def test_logged_lr_is_the_one_applied_during_warmup(tmp_path):
    """Linear warm-up over 4 optimizer steps, one optimizer step per iteration: lr = 1e-2 x n / 4."""
    run = train_tiny(tmp_path / "run", 2, "train.warmup_steps=4", "train.checkpoint_every=0")
    assert [r["lr"] for r in read_metrics(run)] == pytest.approx([1e-2 * 1 / 4, 1e-2 * 2 / 4])


def test_anchor_holds_the_untrained_steps_near_the_base_model(tmp_path):
    """With one trained step, the anchor penalises the velocity drift at the other: 0 while the
    LoRA is still the identity, and a heavy anchor_beta keeps that drift far below a negligible one."""
    base = ["train.window_size=1", "train.lr=3e-2", "--objectives", "brightness"]
    light = read_metrics(train_tiny(tmp_path / "light", 4, *base, "train.experimental.anchor_beta=1e-9"))
    heavy = read_metrics(train_tiny(tmp_path / "heavy", 4, *base, "train.experimental.anchor_beta=1e3"))
    assert light[0]["anchor"] == 0.0 and heavy[0]["anchor"] == 0.0  # LoRA B = 0 on the first update
    assert light[-1]["anchor"] > 0
    assert heavy[-1]["anchor"] < 0.2 * light[-1]["anchor"]


def test_nft_loss_trains_from_the_rollout_policy(tmp_path):
    """train.loss=nft: one optimizer step per iteration is on-policy (drift 0 on the first update)
    and moves the LoRA; with two epochs the reference velocities are the rollout policy's, taken
    before any step (a tiny lr leaves the drift ~0, a large one does not); no ratio statistics."""
    nft = ["train.loss=nft", "train.experimental.nft_timesteps=2"]
    rows = read_metrics(train_tiny(tmp_path / "one", 2, *nft, "train.lr=3e-2"))
    assert rows[0]["nft_drift"] == 0.0 and rows[0]["grad_norm"] > 0
    assert "ratio_first" not in rows[0] and "ratio_max_dev" not in rows[0]
    assert rows[1]["nft_drift"] == 0.0 and rows[1]["nft_flow_error"] > 0
    lora = load_lora_file(tmp_path / "one" / "checkpoints" / "step-000002")
    assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 0  # B starts at 0
    two_epochs = [*nft, "train.inner_epochs=2"]
    still = read_metrics(train_tiny(tmp_path / "still", 1, *two_epochs, "train.lr=1e-12"))
    moved = read_metrics(train_tiny(tmp_path / "moved", 1, *two_epochs, "train.lr=3e-2"))
    assert still[0]["nft_drift"] < 1e-12
    assert moved[0]["nft_drift"] > 1e-8
    assert moved[0]["optimizer_steps"] == 2
