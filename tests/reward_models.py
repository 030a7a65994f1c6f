"""Tiny random-weight reward models built in code and saved to a folder (no downloads).

Used by the reward tests and benchmarks/bench_score.py: they exercise the real loading code
(`from_pretrained(local dir)`) on models with the real architectures, only tiny.
"""

from __future__ import annotations

import json
import os
import textwrap

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from apexcli.models.tiny import build_char_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def save_tiny_clip(path: str, seed: int = 0, projection_dim: int = 16, image_size: int = 32) -> str:
    """A 1-layer CLIPModel + CLIPImageProcessor + character tokenizer in `path`."""
    tok = build_char_tokenizer(max_length=32)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def laion_like_head_state(in_dim: int = 768, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the public LAION aesthetic MLP's keys and shapes (random values)."""
    g = torch.Generator().manual_seed(seed)
    dims = [in_dim, 1024, 128, 64, 16, 1]
    keys = ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]
    state = {}
    for key, d_in, d_out in zip(keys, dims[:-1], dims[1:]):
        state[f"{key}.weight"] = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        state[f"{key}.bias"] = torch.randn(d_out, generator=g) * 0.1
    return state


def save_tiny_aes(path: str, seed: int = 0) -> tuple[str, str]:
    """Tiny CLIP (16-d embeddings) in path/clip and a matching head file path/head.pth."""
    clip_dir = save_tiny_clip(os.path.join(path, "clip"), seed=seed, projection_dim=16)
    head_file = os.path.join(path, "head.pth")
    torch.save(laion_like_head_state(16, seed), head_file)
    return clip_dir, head_file


DEQA_CONFIG_PY = """
from transformers import PretrainedConfig


class TinyDeqaConfig(PretrainedConfig):
    model_type = "tiny_deqa"
"""

DEQA_MODELING_PY = '''
import numpy as np
import torch
from transformers import PreTrainedModel

from .configuration_tiny_deqa import TinyDeqaConfig


class TinyDeqaModel(PreTrainedModel):
    """score(images) = 1 + 4 * clamp(w . mean_rgb + b, 0, 1): a stand-in with DeQA's interface."""

    config_class = TinyDeqaConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(3, 1)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)

    def _init_weights(self, module):
        pass

    def score(self, images):
        means = torch.tensor(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) / 255.0
                                       for im in images]))
        means = means.to(self.proj.weight.device, self.proj.weight.dtype)
        return 1.0 + 4.0 * self.proj(means).squeeze(-1).clamp(0.0, 1.0)
'''

DEQA_WEIGHT = (0.5, 0.25, 0.25)
DEQA_BIAS = 0.1


def save_tiny_deqa(path: str) -> str:
    """A remote-code model dir whose AutoModelForCausalLM has DeQA-Score's score(images)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "configuration_tiny_deqa.py"), "w") as fh:
        fh.write(textwrap.dedent(DEQA_CONFIG_PY))
    with open(os.path.join(path, "modeling_tiny_deqa.py"), "w") as fh:
        fh.write(textwrap.dedent(DEQA_MODELING_PY))
    config = {
        "model_type": "tiny_deqa",
        "architectures": ["TinyDeqaModel"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_deqa.TinyDeqaConfig",
            "AutoModelForCausalLM": "modeling_tiny_deqa.TinyDeqaModel",
        },
        "torch_dtype": "float32",
    }
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config, fh)
    save_file(
        {"proj.weight": torch.tensor([list(DEQA_WEIGHT)]), "proj.bias": torch.tensor([DEQA_BIAS])},
        os.path.join(path, "model.safetensors"),
    )
    return path


def expected_deqa(images) -> list[float]:
    """The tiny DeQA score computed by hand."""
    import numpy as np

    out = []
    for im in images:
        m = np.asarray(im.convert("RGB"), dtype=np.float64).mean(axis=(0, 1)) / 255.0
        out.append(1.0 + 4.0 * min(1.0, max(0.0, float(np.dot(DEQA_WEIGHT, m) + DEQA_BIAS))))
    return out


def text_image(text: str = "HELLO WORLD", size: tuple[int, int] = (320, 96), font_size: int = 36):
    """Black text on white, drawn with the DejaVuSans font that matplotlib ships."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), font_size)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(
        ((size[0] - (right - left)) // 2 - left, (size[1] - (bottom - top)) // 2 - top), text, fill="black", font=font
    )
    return img
