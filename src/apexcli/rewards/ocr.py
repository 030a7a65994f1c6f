"""OCR reward: does the image show the text the prompt quotes?

    target  = text after the first straight double quote, up to the next one (`"…"`; as the
              reference, prompt.split('"')[1]); curly quotes “…” only when there is no straight
              quote; lowercased, whitespace removed
    read    = all recognised text lines joined, lowercased, whitespace removed
    reward  = 1                                   if target is a substring of read
              1 − min(lev(read, target), |target|) / |target|   otherwise   (in [0, 1])
              NaN                                 if the prompt quotes nothing

Backends read the same input: every image goes through PIL RGB (so CMYK, palette, 16-bit
inputs are converted first), then to a uint8 BGR array. `rapidocr` (default) ships PP-OCR
ONNX models and works offline; `paddleocr` supports the 2.x (`.ocr`) and 3.x (`.predict`) APIs.
One engine per worker thread; onnxruntime releases the GIL, so workers run in parallel.

Models (rapidocr 3.10 wheel, checked in its config.yaml and models/): detection PP-OCRv6
det small, recognition PP-OCRv6 rec small (one multilingual model: Chinese, English, Latin
scripts, Japanese), 180° classifier ch_ppocr_mobile_v2.0_cls. The English-only recognisers
(en_PP-OCRv4/v5 rec mobile, what the reference's PaddleOCR(lang="en") uses) are downloads
that the wheel does not ship, so whether one reads English signs better is not measured here;
the bundled model read all 12 rendered English words and phrases of
`benchmarks/ocr_orientation.py` exactly. It also reads upside-down text: with the classifier
off those 12, turned 180°, still earn 0.63 on average (6 exact), so keeping the reference's
"upside-down text earns nothing" needs the classifier to find such lines and drop them
(`rewards.ocr.upside_down=drop`, the default: 0.00, upright still 1.00).
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein

from apexcli.errors import ApexError
from apexcli.prompts import quoted_text, quotes_text
from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import OcrConfig

UPSIDE_DOWN = ("drop", "rotate", "read")


def ocr_target(prompt: str) -> str | None:
    """Normalised quoted text of the prompt (``prompts.quoted_text``), or None when it quotes nothing."""
    return normalize_text(quoted_text(prompt)) or None


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
        self.drop_upside_down = config.upside_down == "drop"
        params: dict[str, Any] = {
            "Global.log_level": "error",
            "Global.use_cls": config.upside_down != "read",
            "EngineConfig.onnxruntime.intra_op_num_threads": int(config.threads_per_worker),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if config.use_gpu:
            params["EngineConfig.onnxruntime.use_cuda"] = True
        if config.det_side > 0:
            params["Det.limit_side_len"] = int(config.det_side)
        self.engine = RapidOCR(params=params)
        steps = ("load_img", "preprocess_img", "run_ocr_steps")
        if self.drop_upside_down and not all(hasattr(self.engine, n) for n in steps):
            raise ApexError(
                "this rapidocr does not expose its OCR steps (needed to drop upside-down lines); "
                "pip install -U rapidocr (3.10 does), or set rewards.ocr.upside_down=rotate (or read)"
            )

    def read(self, bgr: np.ndarray) -> str:
        if not self.drop_upside_down:
            result = self.engine(bgr)
            return " ".join(getattr(result, "txts", None) or ())
        # The steps of RapidOCR.__call__, keeping the classifier's verdict per line: a line it
        # calls 180° (the same test under which it would rotate it) is dropped, not read.
        eng = self.engine
        img, record = eng.preprocess_img(eng.load_img(bgr))
        _, cls, rec, _ = eng.run_ocr_steps(img, record)
        texts, scores = rec.txts or (), rec.scores or ()
        verdicts = cls.cls_res or [("0", 0.0)] * len(texts)
        thresh = float(eng.cfg.Cls.cls_thresh)
        min_score = float(getattr(eng, "text_score", 0.5))  # what RapidOCR.__call__ filters on
        return " ".join(
            t
            for t, s, (label, conf) in zip(texts, scores, verdicts)
            if t.strip() and s >= min_score and not ("180" in label and conf > thresh)
        )


class PaddleOcrEngine:
    """PaddleOCR 2.x (`ocr(img, cls=False)`) or 3.x (`predict(img)`)."""

    def __init__(self, config: OcrConfig):
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError:
            raise ApexError(
                "paddleocr is not installed; pip install 'apexcli[paddle]' or use rewards.ocr.backend=rapidocr"
            ) from None
        self.major = int(str(getattr(paddleocr, "__version__", "2")).split(".")[0] or 2)
        # drop and read both run without the classifier: the reference's setting; its English
        # recogniser reads upside-down text as garbage
        self.rotate = config.upside_down == "rotate"
        try:
            if self.major >= 3:
                self.engine = PaddleOCR(
                    lang=config.lang,
                    device="gpu" if config.use_gpu else "cpu",
                    use_doc_orientation_classify=False,
                    use_doc_unwarping=False,
                    use_textline_orientation=self.rotate,
                )
            else:
                self.engine = PaddleOCR(
                    use_angle_cls=self.rotate, lang=config.lang, use_gpu=config.use_gpu, show_log=False
                )
        except Exception as exc:  # it fetches models on first construction; offline this fails
            raise ApexError(
                f"PaddleOCR {paddleocr.__version__} could not start ({type(exc).__name__}); it downloads "
                "its models on first use: run once online, or use rewards.ocr.backend=rapidocr"
            ) from None

    def read(self, bgr: np.ndarray) -> str:
        if self.major >= 3:
            return " ".join(t for res in self.engine.predict(bgr) for t in res["rec_texts"])
        pages = self.engine.ocr(bgr, cls=self.rotate) or [None]
        return " ".join(line[1][0] for line in (pages[0] or []))


BACKENDS: dict[str, Callable[[OcrConfig], OcrEngine]] = {"rapidocr": RapidOcrEngine, "paddleocr": PaddleOcrEngine}


class OcrReward(Reward):
    name = "ocr"
    needs_prompt = True
    cpu_bound = True
    uses_pil = True
    prompt_requirement = 'prompts with quoted text ("...")'
    prompt_fix = "prompts.train=builtin:mixed (or builtin:ocr, or your own file)"

    @classmethod
    def applies_to(cls, prompt: str) -> bool:
        return quotes_text(prompt)

    def __init__(self, config: OcrConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if config.backend not in BACKENDS:
            raise ApexError(
                f"unknown OCR backend {config.backend!r}; valid: {', '.join(BACKENDS)} (rewards.ocr.backend)"
            )
        if config.upside_down not in UPSIDE_DOWN:
            raise ApexError(f"unknown rewards.ocr.upside_down {config.upside_down!r}; valid: {', '.join(UPSIDE_DOWN)}")
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
