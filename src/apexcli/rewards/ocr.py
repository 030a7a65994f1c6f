"""OCR reward: does the image show the text the prompt quotes?

    target  = text inside the first pair of double quotes ("…" or “…”), lowercased, spaces removed
    read    = all recognised text lines joined, lowercased, whitespace removed
    reward  = 1                                   if target is a substring of read
              1 − min(lev(read, target), |target|) / |target|   otherwise   (in [0, 1])
              NaN                                 if the prompt quotes nothing

Backends read the same input: every image goes through PIL RGB (so CMYK, palette, 16-bit
inputs are converted first), then to a uint8 BGR array. `rapidocr` (default) ships PP-OCR
ONNX models and works offline; `paddleocr` supports the 2.x (`.ocr`) and 3.x (`.predict`) APIs.
One engine per worker thread; onnxruntime releases the GIL, so workers run in parallel.
"""

from __future__ import annotations

import math
import queue
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Protocol

import numpy as np
import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein

from apexcli.errors import ApexError
from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import OcrConfig

_QUOTED = re.compile(r'"([^"]*)"|“([^”]*)”')


def ocr_target(prompt: str) -> str | None:
    """Normalised text of the first quoted span, or None when the prompt quotes nothing."""
    match = _QUOTED.search(prompt or "")
    if match is None:
        return None
    text = normalize_text(match.group(1) if match.group(1) is not None else match.group(2))
    return text or None


def normalize_text(text: str) -> str:
    """Lowercase and drop every whitespace character."""
    return "".join(text.lower().split())


def ocr_reward(recognized: str, target: str | None) -> float:
    """1 − min(lev, len)/len on normalised strings; 1 when the target is contained; NaN without target."""
    if not target:
        return math.nan
    read = normalize_text(recognized)
    if target in read:
        return 1.0
    dist = Levenshtein.distance(read, target)
    return 1.0 - min(dist, len(target)) / len(target)


def to_bgr(image: Image.Image) -> np.ndarray:
    """The one pre-processing step shared by all backends: PIL -> RGB -> uint8 BGR array."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


class OcrEngine(Protocol):
    def read(self, bgr: np.ndarray) -> str: ...


class RapidOcrEngine:
    """RapidOCR 3.x (PP-OCR ONNX models bundled with the package)."""

    def __init__(self, config: OcrConfig):
        try:
            from rapidocr import RapidOCR
        except ImportError:
            raise ApexError("rapidocr is not installed; pip install rapidocr onnxruntime") from None
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "EngineConfig.onnxruntime.intra_op_num_threads": int(config.threads_per_worker),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if config.use_gpu:
            params["EngineConfig.onnxruntime.use_cuda"] = True
        if config.det_side > 0:
            params["Det.limit_side_len"] = int(config.det_side)
        self.engine = RapidOCR(params=params)

    def read(self, bgr: np.ndarray) -> str:
        result = self.engine(bgr)
        return " ".join(getattr(result, "txts", None) or ())


class PaddleOcrEngine:
    """PaddleOCR 2.x (`ocr(img, cls=False)`) or 3.x (`predict(img)`)."""

    def __init__(self, config: OcrConfig):
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError:
            raise ApexError("paddleocr is not installed; pip install 'apexcli[paddle]' or use rewards.ocr.backend=rapidocr") from None
        self.major = int(str(getattr(paddleocr, "__version__", "2")).split(".")[0] or 2)
        try:
            if self.major >= 3:
                self.engine = PaddleOCR(lang=config.lang, device="gpu" if config.use_gpu else "cpu",
                                        use_doc_orientation_classify=False, use_doc_unwarping=False,
                                        use_textline_orientation=False)
            else:
                self.engine = PaddleOCR(use_angle_cls=False, lang=config.lang, use_gpu=config.use_gpu, show_log=False)
        except Exception as exc:  # it fetches models on first construction; offline this fails
            raise ApexError(f"PaddleOCR {paddleocr.__version__} could not start ({type(exc).__name__}); it downloads "
                            "its models on first use: run once online, or use rewards.ocr.backend=rapidocr") from None

    def read(self, bgr: np.ndarray) -> str:
        if self.major >= 3:
            return " ".join(t for res in self.engine.predict(bgr) for t in res["rec_texts"])
        pages = self.engine.ocr(bgr, cls=False) or [None]
        return " ".join(line[1][0] for line in (pages[0] or []))


BACKENDS: dict[str, Callable[[OcrConfig], OcrEngine]] = {"rapidocr": RapidOcrEngine, "paddleocr": PaddleOcrEngine}


class OcrReward(Reward):
    name = "ocr"
    needs_prompt = True
    cpu_bound = True
    uses_pil = True

    def __init__(self, config: OcrConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if config.backend not in BACKENDS:
            raise ApexError(f"unknown OCR backend {config.backend!r}; valid: {', '.join(BACKENDS)} (rewards.ocr.backend)")
        self.workers = max(1, int(config.workers))
        self.batch_size = 1024  # images are fanned out to the workers; no model batch
        self._engines: queue.Queue[OcrEngine] = queue.Queue()
        for _ in range(self.workers):
            self._engines.put(BACKENDS[config.backend](config))
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="apex-ocr")

    def read(self, image: Image.Image) -> str:
        """Recognised text of one image, with whichever engine is free."""
        engine = self._engines.get()
        try:
            return engine.read(to_bgr(image))
        finally:
            self._engines.put(engine)

    def score(self, batch: ImageBatch, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        targets = [ocr_target(p) for p in prompts]
        images = batch.pil()
        # Images whose prompt quotes nothing are not read at all: their reward is NaN anyway.
        futures = {i: self._pool.submit(self.read, images[i]) for i, t in enumerate(targets) if t}
        texts = [futures[i].result() if i in futures else "" for i in range(len(targets))]
        scores = torch.tensor([ocr_reward(txt, tgt) for txt, tgt in zip(texts, targets)], dtype=torch.float32)
        return scores, {"text": texts, "target": [t or "" for t in targets]}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
