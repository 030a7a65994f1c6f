"""pick and aes through their real loading code, on tiny random CLIPs saved to a temp dir."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from apexcli.errors import ApexError
from apexcli.rewards import AesConfig, PickConfig
from apexcli.rewards.aes import Aesthetic, AestheticHead, load_head_state
from apexcli.rewards.base import pil_to_tensor
from apexcli.rewards.clip_preprocess import ClipPreprocess
from apexcli.rewards.hub import override_hint
from apexcli.rewards.pick import PickScore
from helpers import HANG_GUARD_S
from reward_models import laion_like_head_state, save_tiny_aes, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(str(tmp_path_factory.mktemp("pick")))


@pytest.fixture(scope="module")
def aes_paths(tmp_path_factory):
    return save_tiny_aes(str(tmp_path_factory.mktemp("aes")))


def smooth_images(sizes, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for w, h in sizes:
        small = Image.fromarray(g.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8))
        out.append(small.resize((w, h), Image.BILINEAR))
    return out


@pytest.mark.parametrize("size", [(50, 37), (37, 50), (32, 32), (200, 120), (20, 20)])
def test_tensor_preprocess_matches_the_processor(clip_dir, size):
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    img = smooth_images([size])[0]
    ref = proc(images=[img], return_tensors="pt").pixel_values
    ours = ClipPreprocess.from_processor(proc)([pil_to_tensor(img)], "cpu", torch.float32)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # PIL's arithmetic, to float rounding


def photo_like(w, h, cell, g):
    """Smooth colour blobs plus pixel noise, like a decoded sample."""
    small = Image.fromarray(g.integers(0, 256, (h // cell + 1, w // cell + 1, 3), dtype=np.uint8))
    base = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(base + g.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(512, 512), (1024, 1024), (512, 768), (64, 64)])
def test_matches_openai_clip_processor_on_sample_sizes(size):
    # OpenAI-CLIP settings (shortest edge 224, crop 224); 64^2 is upscaled. A float resize
    # without PIL's uint8 store between its passes was off by up to 3.6 levels at 512^2, 6.9
    # at 64^2; the images arrive as a float batch, as the VAE decodes them.
    proc = CLIPImageProcessor()
    g = np.random.default_rng(size[0] + size[1])
    images = [photo_like(*size, cell=max(4, size[0] // 32), g=g) for _ in range(2)]
    ref = proc(images=images, return_tensors="pt").pixel_values
    batch = torch.stack([pil_to_tensor(im) for im in images])
    ours = ClipPreprocess.from_processor(proc)(batch, "cpu", torch.float32)
    assert ours.shape == ref.shape == (2, 3, 224, 224)
    levels = ((ours - ref) * torch.tensor(proc.image_std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max().item() < 1e-3


def test_pick_is_logit_scale_times_cosine(clip_dir):
    reward = PickScore(PickConfig(source=clip_dir, processor_source=clip_dir))
    images = smooth_images([(48, 40), (64, 64), (40, 56)])
    prompts = ["a red cat", "a sign", "a red cat"]
    scores, _ = reward(images, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    # by hand, with the stock processor and tokenizer
    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=pixels), dim=-1)
        tokens = tok(prompts, padding=True, return_tensors="pt")
        txt = F.normalize(
            model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]), dim=-1
        )
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
    torch.testing.assert_close(scores, expected, atol=2e-2, rtol=0)


def test_pick_depends_on_the_prompt_and_batches_consistently(clip_dir):
    reward = PickScore(PickConfig(source=clip_dir, processor_source=clip_dir, batch_size=2))
    x = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    a, _ = reward(x, ["a photo of a dog"] * 5)
    b, _ = reward(x, ["zzz qqq 123"] * 5)
    assert not torch.allclose(a, b)
    whole, _ = PickScore(PickConfig(source=clip_dir, processor_source=clip_dir, batch_size=64))(
        x, ["a photo of a dog"] * 5
    )
    torch.testing.assert_close(a, whole, atol=1e-5, rtol=1e-5)


def test_aes_is_the_mlp_on_the_normalised_embedding(aes_paths):
    clip_dir, head_file = aes_paths
    reward = Aesthetic(AesConfig(clip_source=clip_dir, head_source=head_file))
    x = torch.rand(4, 3, 48, 36, generator=torch.Generator().manual_seed(2))
    scores, _ = reward(x)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    vision = CLIPModel.from_pretrained(clip_dir).eval()
    pre = ClipPreprocess.from_processor(CLIPImageProcessor.from_pretrained(clip_dir))
    state = torch.load(head_file, weights_only=True)
    with torch.no_grad():
        e = vision.get_image_features(pixel_values=pre(x, "cpu", torch.float32))
        e = e / e.norm(dim=-1, keepdim=True)
        h = e @ state["layers.0.weight"].T + state["layers.0.bias"]
        for k in ("layers.2", "layers.4", "layers.6", "layers.7"):  # linear layers, no activations
            h = h @ state[f"{k}.weight"].T + state[f"{k}.bias"]
    torch.testing.assert_close(scores, h.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_public_laion_state_dict_loads_into_the_head(tmp_path):
    state = laion_like_head_state(768)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    head = AestheticHead.from_state_dict(load_head_state(str(path)))
    assert [m.in_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [768, 1024, 128, 64, 16]
    x = F.normalize(torch.randn(2, 768), dim=-1)
    expected = x
    for k in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
        expected = expected @ state[f"{k}.weight"].T + state[f"{k}.bias"]
    torch.testing.assert_close(head.eval()(x), expected)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "head.safetensors"))
    assert set(load_head_state(str(tmp_path / "head.safetensors"))) == set(state)


class NotATensor:  # a pickled object: torch.load(weights_only=True) must refuse it
    pass


def test_head_loading_is_safe_and_checks_keys(tmp_path):
    torch.save({"layers.0.weight": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ApexError, match="not a plain tensor state dict"):
        load_head_state(str(tmp_path / "evil.pth"))
    with pytest.raises(ApexError, match="expected keys layers.0/2/4/6/7"):
        AestheticHead.from_state_dict({"fc.weight": torch.zeros(1, 1)})


def test_aes_head_dim_must_match_the_clip(tmp_path, aes_paths):
    clip_dir, _ = aes_paths
    torch.save(laion_like_head_state(768), tmp_path / "h.pth")
    with pytest.raises(ApexError, match="expects 768-d embeddings"):
        Aesthetic(AesConfig(clip_source=clip_dir, head_source=str(tmp_path / "h.pth")))


def test_missing_local_dir_is_one_line():
    with pytest.raises(ApexError) as err:
        PickScore(PickConfig(source="/nonexistent/pickscore", processor_source="/nonexistent/pickscore"))
    assert "pass --set rewards.pick.source=DIR" in str(err.value) and "\n" not in str(err.value)
    with override_hint("set {option} to DIR in runs/x/config.yaml"), pytest.raises(ApexError) as err:
        PickScore(PickConfig(source="/nonexistent/pickscore", processor_source="/nonexistent/pickscore"))
    assert "set rewards.pick.source to DIR in runs/x/config.yaml" in str(err.value)


def test_missing_weights_offline_names_model_download_and_option():
    code = (
        "from apexcli.errors import ApexError\n"
        "from apexcli.rewards import RewardSuite\n"
        "try:\n    RewardSuite(['pick'])\nexcept ApexError as e:\n    print('ERR', e)\n"
    )
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=os.path.join(os.sep, "nonexistent-hf-home")
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("ERR")]
    assert line, out.stdout + out.stderr
    msg = line[0]
    assert "yuvalkirstain/PickScore_v1" in msg
    assert "huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir" in msg
    assert "then pass --set rewards.pick.source=DIR" in msg  # the syntax of apex train, score and serve
    assert "Traceback" not in out.stderr
