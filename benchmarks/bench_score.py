"""RewardSuite vs a naive scoring loop on the same 64 images.

    python benchmarks/bench_score.py [--n 64] [--size 256] [--device cpu|cuda] [--repeats 2]

Rewards: pick and aes on tiny random CLIPs (built in code, saved to a temp dir, loaded through
the real loaders, image size 224 like the real processors), real RapidOCR, and the toy set.
Naive: each reward in turn, the HF processor called per image, the models called per image,
OCR serial with one default RapidOCR engine. Suite: one RewardSuite call on the [N,3,H,W]
tensor (device-side pre-processing, per-model batches, OCR workers beside the models).
Prints images/s for both and the ratio (target >= 2x on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from apexcli.rewards import RewardsConfig, RewardSuite
from apexcli.rewards.base import ImageBatch, pil_to_tensor
from apexcli.rewards.ocr import ocr_reward, ocr_target, to_bgr
from apexcli.rewards.toy import brightness, colorfulness, contrast, jpeg_kilobytes
from reward_models import save_tiny_aes, save_tiny_clip, text_image

OBJECTIVES = ["pick", "aes", "ocr", "brightness", "colorfulness", "compressibility", "contrast"]
WORDS = ["HELLO WORLD", "APEX", "OPEN 24H", "GRPO", "FLOW", "PARETO", "STOP", "CAFE"]


def make_batch(n: int, size: int) -> tuple[torch.Tensor, list[str]]:
    g = np.random.default_rng(0)
    images, prompts = [], []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        img = text_image(word, size=(size, size), font_size=max(12, size // 9))
        arr = np.asarray(img).astype(np.int16) + g.integers(-20, 20, (size, size, 3))
        images.append(torch.from_numpy(np.clip(arr, 0, 255).astype(np.uint8)).permute(2, 0, 1).float() / 255)
        prompts.append(f'a poster that says "{word}"')
    return torch.stack(images), prompts


class NaiveScorer:
    """Each reward in turn, one image at a time, the HF processor per image, OCR serial."""

    def __init__(self, cfg: RewardsConfig, device: str):
        from rapidocr import RapidOCR
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from apexcli.rewards.aes import AestheticHead, load_head_state

        self.cfg, self.device = cfg, device
        self.pick = CLIPModel.from_pretrained(cfg.pick.source).to(device).eval()
        self.proc = CLIPImageProcessor.from_pretrained(cfg.pick.processor_source)
        self.tok = AutoTokenizer.from_pretrained(cfg.pick.processor_source)
        self.aes_clip = CLIPModel.from_pretrained(cfg.aes.clip_source).to(device).eval()
        self.aes_proc = CLIPImageProcessor.from_pretrained(cfg.aes.clip_source)
        self.head = AestheticHead.from_state_dict(load_head_state(cfg.aes.head_source)).to(device).eval()
        self.engine = RapidOCR(params={"Global.log_level": "error"})  # default engine: all CPU threads
        self.seconds: dict[str, float] = {}

    def _timed(self, name: str, fn) -> list[float]:
        t0 = time.perf_counter()
        out = fn()
        self.seconds[name] = time.perf_counter() - t0
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pils = ImageBatch(images.cpu()).pil()
        dev = self.device

        def pick() -> list[float]:
            vals = []
            for im, p in zip(pils, prompts):
                px = self.proc(images=im, return_tensors="pt").pixel_values.to(dev)
                t = self.tok([p], padding=True, truncation=True, max_length=32, return_tensors="pt").to(dev)
                a = F.normalize(self.pick.get_image_features(pixel_values=px), dim=-1)
                b = F.normalize(
                    self.pick.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]), dim=-1
                )
                vals.append((self.pick.logit_scale.exp() * (a * b).sum(-1)).item())
            return vals

        def aes() -> list[float]:
            vals = []
            for im in pils:
                px = self.aes_proc(images=im, return_tensors="pt").pixel_values.to(dev)
                vals.append(self.head(F.normalize(self.aes_clip.get_image_features(pixel_values=px), dim=-1)).item())
            return vals

        cols = [
            self._timed("pick", pick),
            self._timed("aes", aes),
            self._timed(
                "ocr",
                lambda: [
                    ocr_reward(" ".join(self.engine(to_bgr(im)).txts or ()), ocr_target(p))
                    for im, p in zip(pils, prompts)
                ],
            ),
            self._timed("brightness", lambda: [brightness(pil_to_tensor(im).unsqueeze(0)).item() for im in pils]),
            self._timed("colorfulness", lambda: [colorfulness(pil_to_tensor(im).unsqueeze(0)).item() for im in pils]),
            self._timed("compressibility", lambda: [-jpeg_kilobytes(im, self.cfg.toy.jpeg_quality) for im in pils]),
            self._timed("contrast", lambda: [contrast(pil_to_tensor(im).unsqueeze(0)).item() for im in pils]),
        ]
        return torch.tensor(cols, dtype=torch.float32).T


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ocr-workers", type=int, default=max(1, (os.cpu_count() or 2)))
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="apex-bench-")
    cfg = RewardsConfig()
    cfg.pick.source = cfg.pick.processor_source = save_tiny_clip(os.path.join(tmp, "pick"), image_size=224)
    cfg.aes.clip_source, cfg.aes.head_source = save_tiny_aes(os.path.join(tmp, "aes"))
    cfg.ocr.workers = args.ocr_workers
    images, prompts = make_batch(args.n, args.size)
    print(
        f"{args.n} images {args.size}x{args.size}, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"ocr workers {cfg.ocr.workers}; objectives {','.join(OBJECTIVES)}"
    )

    naive_scorer = NaiveScorer(cfg, args.device)
    naive_scorer(images[:4], prompts[:4])  # warm-up, as for the suite
    naive_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        R_naive = naive_scorer(images, prompts)
        naive_times.append(time.perf_counter() - t0)
    suite = RewardSuite(OBJECTIVES, device=args.device, config=cfg)
    suite(images[:4].to(args.device), prompts[:4])  # warm-up (lazy inits, allocator)
    suite_times = []
    for _ in range(args.repeats):
        x = images.to(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        R_suite, _ = suite(x, prompts)
        suite_times.append(time.perf_counter() - t0)
    suite.close()

    naive, fused = min(naive_times), min(suite_times)
    print(f"naive loop : {args.n / naive:8.2f} images/s  ({naive:.2f} s; models loaded beforehand)")
    print("   naive per reward (last run): " + ", ".join(f"{k} {v:.2f}s" for k, v in naive_scorer.seconds.items()))
    print(f"RewardSuite: {args.n / fused:8.2f} images/s  ({fused:.2f} s; models loaded beforehand)")
    print(f"ratio      : {naive / fused:8.2f}x")
    diff = (R_suite - R_naive).abs().nan_to_num(0).max(dim=0).values
    print("max |suite - naive| per objective: " + ", ".join(f"{n}={d:.3g}" for n, d in zip(OBJECTIVES, diff.tolist())))


if __name__ == "__main__":
    main()
