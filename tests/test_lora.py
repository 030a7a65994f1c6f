"""LoRA attach/save/load in diffusers' format, and pipeline loading from a local directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apexcli.backbones.base import JOINT_ATTENTION_PROJECTIONS
from apexcli.config import ModelConfig
from apexcli.errors import ApexError
from apexcli.models.loading import load_pipeline
from apexcli.models.lora import attach_lora, load_lora_into_adapter, lora_state_dict, resolve_lora_path, save_lora
from apexcli.models.tiny import build_tiny_pipeline
from apexcli.runs import LORA_FILE


def _velocity(transformer) -> torch.Tensor:
    """The transformer's output on fixed inputs (latent 4x16x16, 8 text tokens)."""
    gen = torch.Generator().manual_seed(123)
    hidden = torch.randn(2, 4, 16, 16, generator=gen)
    text = torch.randn(2, 8, 32, generator=gen)
    pooled = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        return transformer(
            hidden_states=hidden,
            timestep=torch.tensor([500.0, 900.0]),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


def _attached(rank: int = 4, targets=JOINT_ATTENTION_PROJECTIONS, seed: int = 0):
    transformer = build_tiny_pipeline().transformer
    params = attach_lora(transformer, rank=rank, alpha=2 * rank, dropout=0.0, target_modules=list(targets), seed=seed)
    return transformer, params


def _perturb(params, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    """A rank-4 LoRA with non-zero B saved by ``save_lora``; returns (dir, model output with it)."""
    transformer, params = _attached()
    _perturb(params)
    directory = tmp_path_factory.mktemp("lora")
    save_lora(transformer, directory)
    return directory, _velocity(transformer), lora_state_dict(transformer)


def test_attach_starts_at_the_base_model_and_trains_only_lora():
    base = build_tiny_pipeline().transformer
    reference = _velocity(base)
    transformer, params = _attached()
    assert torch.equal(_velocity(transformer), reference)  # B = 0: the policy starts as the base model
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    assert len(names) == len(params) > 0
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(p.dtype == torch.float32 for p in params)
    for name, p in transformer.named_parameters():
        if ".lora_B." in name:
            assert torch.count_nonzero(p) == 0
    # every default target got an adapter (the tiny model has 2 joint blocks; the last one has
    # no context output projection, as in SD3)
    targets = {n.split(".lora_")[0].split(".", 2)[2] for n in names}
    assert targets == set(JOINT_ATTENTION_PROJECTIONS)


def test_attach_is_deterministic_from_the_seed():
    a, _ = _attached(seed=5)
    b, _ = _attached(seed=5)
    c, _ = _attached(seed=6)
    sa, sb, sc = lora_state_dict(a), lora_state_dict(b), lora_state_dict(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if "lora_A" in k)


def test_attach_with_no_matching_module_is_an_error():
    with pytest.raises(ApexError, match="matched no module"):
        _attached(targets=["attn.nosuch_proj"])


def test_saved_file_is_diffusers_format(saved_lora):
    directory, _, state = saved_lora
    tensors = load_file(str(directory / LORA_FILE))
    assert tensors and all(k.startswith("transformer.") for k in tensors)
    assert {k.rsplit(".", 2)[-2] for k in tensors} == {"lora_A", "lora_B"}
    assert len(tensors) == len(state)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].shape == (32, 4)


def test_diffusers_load_lora_weights_reproduces_the_trained_output(saved_lora):
    directory, with_lora, _ = saved_lora
    pipe = build_tiny_pipeline()
    base = _velocity(pipe.transformer)
    pipe.load_lora_weights(str(directory), weight_name="pytorch_lora_weights.safetensors")
    loaded = _velocity(pipe.transformer)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the model
    torch.testing.assert_close(loaded, with_lora, rtol=1e-5, atol=1e-5)


def test_load_into_adapter_round_trips(saved_lora):
    directory, with_lora, state = saved_lora
    transformer, _ = _attached()
    load_lora_into_adapter(transformer, directory)
    loaded = lora_state_dict(transformer)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(_velocity(transformer), with_lora)


def test_load_into_mismatched_adapter_is_one_line_error(saved_lora):
    directory, _, _ = saved_lora
    wrong_rank, _ = _attached(rank=8)
    with pytest.raises(ApexError, match="does not fit") as info:
        load_lora_into_adapter(wrong_rank, directory)
    assert "\n" not in str(info.value)
    fewer_targets, _ = _attached(targets=["attn.to_q"])
    with pytest.raises(ApexError, match="unexpected keys"):
        load_lora_into_adapter(fewer_targets, directory)
    # the saved LoRA covers fewer modules than the adapter: not silently half-loaded
    only_q, params = _attached(targets=["attn.to_q"])
    _perturb(params)
    partial = directory.parent / "partial"
    save_lora(only_q, partial)
    full, _ = _attached()
    with pytest.raises(ApexError, match="missing keys"):
        load_lora_into_adapter(full, partial)


def test_resolve_lora_path(tmp_path, saved_lora):
    directory, _, _ = saved_lora
    assert resolve_lora_path(directory) == directory
    assert resolve_lora_path(directory / LORA_FILE) == directory
    run = tmp_path / "run"
    for step in (2, 10):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / LORA_FILE).write_bytes(b"x")
    (run / "checkpoints" / "step-000020").mkdir()  # incomplete: no LoRA file
    (run / "checkpoints" / ".step-000030.abc.tmp").mkdir()  # a crashed save's temp dir
    assert resolve_lora_path(run) == run / "checkpoints" / "step-000010"
    with pytest.raises(ApexError, match="does not exist"):
        resolve_lora_path(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ApexError, match="no checkpoints"):
        resolve_lora_path(tmp_path / "empty")


def test_load_pipeline_from_a_local_directory(tmp_path):
    pipe = build_tiny_pipeline(seed=3)
    pipe.save_pretrained(str(tmp_path / "sd3"))
    loaded = load_pipeline(ModelConfig(pretrained=str(tmp_path / "sd3"), dtype="float32", local_files_only=True))
    a, b = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.tokenizer_3("a red apple").input_ids == pipe.tokenizer_3("a red apple").input_ids
    half = load_pipeline(ModelConfig(pretrained=str(tmp_path / "sd3"), dtype="bfloat16"))
    assert half.transformer.dtype == torch.bfloat16


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(ApexError, match="model_index.json"):
        load_pipeline(ModelConfig(pretrained=str(tmp_path)))
    with pytest.raises(ApexError, match="--local-dir") as info:
        load_pipeline(ModelConfig(pretrained="someorg/not-cached", local_files_only=True))
    assert "someorg/not-cached" in str(info.value) and "\n" not in str(info.value)


def test_saved_lora_files_are_byte_identical_across_processes(tmp_path):
    # the adapter's target modules are a set: its order follows each process's string hashing
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from apexcli.models.tiny import build_tiny_pipeline\n"
        "from apexcli.models.lora import attach_lora, save_lora\n"
        "t = build_tiny_pipeline().transformer\n"
        "attach_lora(t, rank=4, alpha=8, dropout=0.0, seed=0,\n"
        "            target_modules=['to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj', 'add_k_proj', 'add_v_proj'])\n"
        "save_lora(t, sys.argv[1])\n"
    )
    files = []
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        subprocess.run(
            [sys.executable, "-c", script, str(out)], check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}
        )
        files.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]


def _corrupted(saved_lora, tmp_path, name: str, change) -> tuple[Path, str]:
    """A copy of the saved LoRA whose first lora_A tensor is ``change(tensor)``; (file, key)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory, _, _ = saved_lora
    with safe_open(str(directory / LORA_FILE), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = sorted(k for k in tensors if ".lora_A." in k)[0]
    tensors[key] = change(tensors[key])
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path, key[len("transformer.") :]


@pytest.mark.parametrize(
    "name, change, problem",
    [
        ("flat", lambda t: t.flatten(), "LoRA factors are matrices (2-D)"),
        ("scalar", lambda t: t.sum(), "has shape (); LoRA factors are matrices"),
        ("rank", lambda t: t[:3], "has rank 3 but its lora_B has rank 4"),
        ("int64", lambda t: t.to(torch.int64), "holds int64 values; LoRA factors are floating point"),
        ("nan", lambda t: torch.full_like(t, float("nan")), "holds NaN or infinite values"),
        ("huge", lambda t: torch.full_like(t, 1e30), "holds a value of magnitude 1e+30"),
    ],
)
def test_a_broken_lora_file_is_a_one_line_error_naming_file_and_tensor(saved_lora, tmp_path, name, change, problem):
    """A NaN or 1e30 LoRA was applied without a word (black images, exit 0); the others crashed
    inside diffusers or peft with a traceback."""
    from apexcli.models.lora import load_lora_for_inference

    path, key = _corrupted(saved_lora, tmp_path, name, change)
    with pytest.raises(ApexError) as info:
        load_lora_for_inference(build_tiny_pipeline(), path, option="--checkpoint")
    message = str(info.value)
    assert message.startswith(f"--checkpoint file '{path}': '{key}'") and problem in message and "\n" not in message


def test_errors_name_the_commands_own_option(tmp_path):
    with pytest.raises(ApexError, match="^--checkpoint '.*missing' does not exist"):
        resolve_lora_path(tmp_path / "missing", option="--checkpoint")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ApexError, match="^--lora '.*notes.txt' is a .txt file"):
        resolve_lora_path(tmp_path / "notes.txt")
