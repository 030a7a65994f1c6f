"""RewardSuite: every requested reward, loaded once, scored together into R [N, K].

Device rewards (CLIP models) run in the calling thread, each in chunks of its own batch
size, with tensor pre-processing on the device. CPU-bound rewards (OCR, JPEG size, remote
rewards) run at the same time in a worker pool. `submit` runs the whole thing in a
background thread so the trainer can sample batch i+1 while batch i is being scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image

from apexcli.errors import ApexError
from apexcli.rewards.base import ImageBatch, Reward
from apexcli.rewards.config import RewardsConfig
from apexcli.rewards.registry import (
    REWARD_NAMES,
    build_reward,
    canonical_name,
    remote_batch_size,
    resolve_objective,
    reward_class,
    reward_spec,
    split_remote,
)
from apexcli.rewards.remote import RemoteReward

SUITE_DTYPE = torch.float32
"""The dtype of every reward whose ``rewards.X.dtype`` is empty, in training, evaluation, `apex
score` and `apex serve` alike: one objective, one dtype, the same number for the same image."""


class RewardSuite:
    """Score images on K objectives.

        suite = RewardSuite(["pick", "ocr", "deqa@http://127.0.0.1:18086"], device="cuda")
        R, info = suite(images, prompts)     # R: float32 [N, K] on CPU, NaN = not applicable
        fut = suite.submit(images, prompts)  # Future -> (R, info)
        suite.close()

    `objectives` are names or aliases (pickscore -> pick, aesthetic -> aes); `name@URL` scores that
    reward on a reward server.
    `info[name]` holds that reward's per-image extras (e.g. OCR text), lists of length N.
    """

    def __init__(
        self,
        objectives: Sequence[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = SUITE_DTYPE,
        config: RewardsConfig | None = None,
    ):
        if isinstance(objectives, str):
            objectives = [o for o in objectives.split(",") if o.strip()]
        if not objectives:
            raise ApexError(f"no objectives given; valid: {', '.join(REWARD_NAMES)}")
        self.config = config or RewardsConfig()
        self.device = torch.device(device)
        self.dtype = dtype
        self.objectives: list[str] = []
        self.urls: dict[str, str] = {}
        for objective in objectives:
            key, url = resolve_objective(objective)
            if key in self.objectives:
                raise ApexError(f"objective {key!r} is listed twice in {', '.join(objectives)}")
            self.objectives.append(key)
            self.urls[key] = url
        self.rewards: dict[str, Reward] = {}
        try:
            for key in self.objectives:
                self.rewards[key] = self._build(key)
        except BaseException:
            self.close()
            raise
        n_cpu = sum(1 for r in self.rewards.values() if r.cpu_bound)
        self._pool = ThreadPoolExecutor(max_workers=max(1, n_cpu), thread_name_prefix="apex-reward")
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apex-suite")
        self._side_stream: torch.cuda.Stream | None = None  # created on the first CUDA submit
        self._owner = True

    def view(self, objectives: Sequence[str]) -> RewardSuite:
        """A suite scoring ``objectives`` (a subset of this one's, any order) with this suite's
        reward models and workers: training, evaluation and the progress probe each get their
        columns without loading a reward model twice. Closing a view releases nothing."""
        keys = [canonical_name(split_remote(o)[0]) for o in objectives]
        missing = [k for k in keys if k not in self.rewards]
        if missing:
            raise ApexError(
                f"objective(s) {', '.join(missing)} are not loaded in this reward suite ({', '.join(self.objectives)})"
            )
        view = object.__new__(RewardSuite)
        view.__dict__.update(self.__dict__)
        view.objectives = keys
        view.urls = {k: self.urls[k] for k in keys}
        view.rewards = {k: self.rewards[k] for k in keys}
        view._owner = False
        return view

    def _build(self, key: str) -> Reward:
        if self.urls[key]:
            return RemoteReward(key, self.urls[key], self.config.remote, remote_batch_size(key, self.config))
        return build_reward(key, self.config, self.device, self.dtype)

    @property
    def needs_prompts(self) -> list[str]:
        """Objectives that read the prompt."""
        return [k for k in self.objectives if reward_spec(k).needs_prompt]

    def applies(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[P, K]`` bool: whether objective k scores prompt p (elsewhere its reward is NaN by
        design). The reward's class decides, wherever the reward is scored."""
        classes = [reward_class(k) for k in self.objectives]
        rows = [[cls.applies_to(p) for cls in classes] for p in prompts]
        return torch.tensor(rows, dtype=torch.bool).reshape(len(prompts), len(self.objectives))

    def __call__(
        self, images: torch.Tensor | Sequence[Image.Image] | ImageBatch, prompts: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = images if isinstance(images, ImageBatch) else ImageBatch(images)
        n = len(batch)
        prompts = [""] * n if prompts is None else list(prompts)
        if len(prompts) != n:
            raise ApexError(f"got {n} images but {len(prompts)} prompts")
        if n == 0:
            return torch.zeros(0, len(self.objectives)), {k: {} for k in self.objectives}
        if any(r.uses_pil for r in self.rewards.values()):
            batch.pil()  # convert once, shared by every PIL reader
        pending = {k: self._pool.submit(r, batch, prompts) for k, r in self.rewards.items() if r.cpu_bound}
        results: dict[str, tuple[torch.Tensor, dict]] = {}
        for key, reward in self.rewards.items():
            if not reward.cpu_bound:
                results[key] = reward(batch, prompts)
        for key, fut in pending.items():
            results[key] = fut.result()
        R = torch.stack([results[k][0].float().cpu().reshape(n) for k in self.objectives], dim=1)
        return R, {k: results[k][1] for k in self.objectives}

    def submit(self, images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str] | None = None) -> Future:
        """Score in the background; the Future resolves to (R, info). Do not modify `images` meanwhile.

        CUDA inputs are scored on a side stream that first waits for the work queued so far on
        the caller's stream (so the images are complete), letting sampling continue meanwhile.
        """
        batch = ImageBatch(images)
        ready = None
        if isinstance(images, torch.Tensor) and images.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(images.device))
        prompts = list(prompts) if prompts is not None else None
        return self._background.submit(self._score_in_background, batch, prompts, ready)

    def _score_in_background(
        self, batch: ImageBatch, prompts: list[str] | None, ready: torch.cuda.Event | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if ready is None:
            return self(batch, prompts)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device if self.device.type == "cuda" else None)
        with torch.cuda.stream(self._side_stream):  # the current stream is per thread
            self._side_stream.wait_event(ready)
            return self(batch, prompts)

    def close(self) -> None:
        """Stop the worker threads and release every reward (a view: nothing, its owner does)."""
        if not getattr(self, "_owner", True):
            return
        for pool in (getattr(self, "_background", None), getattr(self, "_pool", None)):
            if pool is not None:
                pool.shutdown(wait=True)
        for reward in self.rewards.values():
            reward.close()

    def __enter__(self) -> RewardSuite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def union_objectives(*lists: Sequence[str]) -> list[str]:
    """Every objective of ``lists`` once, in first-seen order, keyed by canonical name (the
    first spelling wins, so ``deqa@URL`` in training and ``deqa`` in eval are one reward)."""
    seen: dict[str, str] = {}
    for objectives in lists:
        for objective in objectives:
            seen.setdefault(canonical_name(split_remote(objective)[0]), objective)
    return list(seen.values())
