"""Typed configuration of the rewards: one nested dataclass per model reward.

The global config nests `RewardsConfig` under `rewards.`, so every field can be overridden
with a dotted key, e.g. `rewards.pick.source=/local/dir` or `rewards.ocr.backend=paddleocr`.
Where a reward is scored is part of the objective, not of its options: `deqa@http://host:port`.
Only plain types (str, int, float, bool) and nested dataclasses are used, except
`rewards.extra`: the options of rewards added from outside apex, which only their own classes
know (each declares an `Options` dataclass that types and checks them when it is built).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from apexcli.config_upgrade import reject_old_keys
from apexcli.schema import check_fields, deep_merge, from_dict, parse_override, setting


@dataclass
class PickConfig:
    """PickScore_v1: a CLIP-H fine-tuned on human preferences (score = 100·cos ≈ 21–24)."""

    source: str = "yuvalkirstain/PickScore_v1"  # hub id or local dir of the CLIPModel weights
    processor_source: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # hub id or dir: image processor + tokenizer
    batch_size: int = setting(32, ge=1)  # images per forward pass
    dtype: str = (
        ""  # "" = the suite's dtype (float32 unless score/serve get --dtype); else float32 / float16 / bfloat16
    )


@dataclass
class AesConfig:
    """LAION improved aesthetic predictor: MLP on L2-normalised CLIP ViT-L/14 image embeddings (≈ 5–6.5)."""

    clip_source: str = "openai/clip-vit-large-patch14"  # hub id or local dir of the CLIP (vision tower used)
    # The MLP file `sac+logos+ava1-l14-linearMSE.pth` is published by
    # github.com/christophschuhmann/improved-aesthetic-predictor; a hub mirror is
    # camenduru/improved-aesthetic-predictor. Give a hub repo id, a local dir, or a local file
    # (.pth loaded with torch.load(weights_only=True), or .safetensors).
    head_source: str = "camenduru/improved-aesthetic-predictor"
    head_filename: str = "sac+logos+ava1-l14-linearMSE.pth"  # file inside head_source when it is a repo or dir
    batch_size: int = setting(32, ge=1)  # images per forward pass
    dtype: str = ""  # "" = the suite's dtype (float32 unless score/serve get --dtype)


@dataclass
class DeqaConfig:
    """DeQA-Score: a VLM (mPLUG-Owl2 remote code) whose `score(images)` gives 1–5."""

    source: str = "zhiyuanyou/DeQA-Score-Mix3"  # hub id or local dir
    trust_remote_code: bool = False  # must be set explicitly: the model runs Python code from `source`
    attn_implementation: str = "eager"  # passed to from_pretrained ("" = library default)
    batch_size: int = setting(8, ge=1)  # images per score() call
    dtype: str = "float16"  # its score() casts its inputs to half: other dtypes fail there


@dataclass
class OcrConfig:
    """Text rendering accuracy: 1 − min(Levenshtein, len)/len against the prompt's first quoted text."""

    backend: str = setting(
        "rapidocr", choices=("rapidocr", "paddleocr")
    )  # rapidocr (ONNX, ships its models, offline) or paddleocr (2.x or 3.x)
    # OCR threads, each with its own engine (its models loaded once more), run beside the model
    # rewards; 64 is more than OCR ever gains from, and 100000 engines never finished loading
    workers: int = setting(2, ge=1, le=64)
    threads_per_worker: int = setting(1, ge=1, le=64)  # onnxruntime intra-op threads per engine (rapidocr)
    lang: str = "en"  # paddleocr language
    # Text lines printed upside down (180°): "drop" (default) reads them as nothing, as the
    # reference (PaddleOCR without its angle classifier) does; the bundled PP-OCRv6 recogniser
    # reads most of them anyway, so rapidocr finds them with its 180° classifier and drops
    # them. "rotate" turns them upright and reads them (RapidOCR's own default); "read" runs
    # no classifier and keeps whatever the recogniser makes of them.
    upside_down: str = setting("drop", choices=("drop", "rotate", "read"))
    use_gpu: bool = False  # run the OCR engine on the GPU (rapidocr: onnxruntime CUDA EP; paddleocr 2.x: use_gpu)
    # rapidocr text detection scales the image's shorter side to this many pixels; 0 = RapidOCR's
    # default (736). Small renders (the mini world's 64 px) read as well at 128, about 10x faster.
    # At most 4096, the largest image apex samples (1e8 made RapidOCR's resize fail).
    det_side: int = setting(0, ge=0, le=4096)


@dataclass
class ToyConfig:
    """Weight-free metrics for the CPU demo and tests."""

    jpeg_quality: int = setting(95, ge=1, le=100)  # JPEG quality used by `compressibility`


@dataclass
class RemoteConfig:
    """HTTP client settings for rewards served by `apex serve`."""

    timeout_s: float = setting(300.0, gt=0)  # per request
    retries: int = setting(2, ge=0)  # extra attempts on connection errors and 5xx answers
    backoff_s: float = setting(1.0, ge=0)  # wait before retry n is backoff_s · 2^(n-1)


@dataclass
class RewardsConfig:
    """All reward settings (nested under `rewards.` in the global config)."""

    pick: PickConfig = field(default_factory=PickConfig)
    aes: AesConfig = field(default_factory=AesConfig)
    deqa: DeqaConfig = field(default_factory=DeqaConfig)
    ocr: OcrConfig = field(default_factory=OcrConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # Options of rewards from outside apex, by reward name: `rewards.extra.redness.margin=0.1`
    # (typed by the reward's `Options` dataclass). A reward server is named in the objective: `redness@URL`.
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)


def apply_overrides(cfg: RewardsConfig, items: list[str]) -> RewardsConfig:
    """``cfg`` with ``KEY=VALUE`` overrides applied (``rewards.pick.source=/dir`` or
    ``pick.source=/dir``), typed and checked like the run config's overrides."""
    data = dataclasses.asdict(cfg)
    for item in items:
        tree = parse_override(item if item.startswith("rewards.") else f"rewards.{item}")
        reject_old_keys(tree)
        data = deep_merge(data, tree["rewards"])
    config = from_dict(RewardsConfig, data, "rewards.")
    check_fields(config, "rewards.")
    return config
