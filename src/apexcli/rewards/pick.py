"""PickScore_v1 (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

    pick(image, prompt) = exp(logit_scale) · cos(E_img(image), E_txt(prompt))

with exp(logit_scale) = 100 for the released model, so scores are ≈ 21–24. Weights:
`yuvalkirstain/PickScore_v1` (CLIPModel); image processor and tokenizer:
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`. Both sources accept a local dir.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from apexcli.rewards.base import ImageBatch, Reward, resolve_dtype
from apexcli.rewards.clip_preprocess import ClipPreprocess, batch_pixels
from apexcli.rewards.config import PickConfig
from apexcli.rewards.hub import dtype_kwargs, load_pretrained


class PickScore(Reward):
    name = "pick"
    needs_prompt = True

    def __init__(self, config: PickConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, dtype)
        self.batch_size = config.batch_size
        self.model = load_pretrained(
            CLIPModel.from_pretrained,
            config.source,
            what="PickScore_v1 model",
            option="rewards.pick.source",
            **dtype_kwargs(self.dtype),
        )
        self.model.to(self.device).eval().requires_grad_(False)
        proc = load_pretrained(
            CLIPImageProcessor.from_pretrained,
            config.processor_source,
            what="PickScore image processor",
            option="rewards.pick.processor_source",
        )
        self.tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained,
            config.processor_source,
            what="PickScore tokenizer",
            option="rewards.pick.processor_source",
        )
        self.preprocess = ClipPreprocess.from_processor(proc)
        self.max_tokens = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )

    @torch.inference_mode()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings [B, D] (float32); each distinct prompt encoded once."""
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(
            unique, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        emb = F.normalize(
            self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).float(),
            dim=-1,
        )
        index = {p: i for i, p in enumerate(unique)}
        return emb[torch.tensor([index[p] for p in prompts], device=emb.device)]

    @torch.inference_mode()
    def image_embeddings(self, batch: ImageBatch) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] (float32) from device-side pre-processing."""
        pixels = batch_pixels(self.preprocess, batch, self.device, self.dtype)
        return F.normalize(self.model.get_image_features(pixel_values=pixels).float(), dim=-1)

    @torch.inference_mode()
    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        img = self.image_embeddings(batch)
        txt = self.text_embeddings(prompts)
        scale = self.model.logit_scale.float().exp()
        return (scale * (img * txt).sum(dim=-1)).cpu(), {}
