"""Prompt embeddings computed once per prompt and reused (train, sample, eval).

SD3 encodes a prompt with three encoders (CLIP-L, CLIP-G, T5-XXL; T5 alone is ~9.5 GB in
bf16). Prompts repeat every epoch, so each one is encoded once, kept in memory, and
optionally written to ``cache_dir/<key>.safetensors`` with

    key = sha256(encoder_fingerprint + prompt + max_sequence_length)

The fingerprint covers the encoders' configs, tokenizers, dtypes and a strided sample of
their weights, so another encoder (or other weights) never reads stale entries.

Typical use::

    cache = TextEmbeddingCache(run_dir / "text_cache", encoder_fingerprint(pipe))
    cond = encode_prompts(pipe, all_prompts, max_sequence_length=256, device=dev, cache=cache)
    uncond = encode_prompts(pipe, [""], max_sequence_length=256, device=dev, cache=cache)
    free_text_encoders(pipe)   # encoders dropped; later look-ups must hit the cache
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from apexcli.conditioning import PromptEmbeds
from apexcli.errors import ApexError
from apexcli.fileio import atomic_write

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
_SAMPLES_PER_TENSOR = 64  # weight values hashed per parameter tensor: cheap, yet any retrain changes them


def _strided_indices(n: int, device: torch.device) -> torch.Tensor:
    """``min(64, n)`` indices spread evenly over ``0 .. n - 1``, first and last included.

    Integer arithmetic: a float32 ``linspace`` rounds ``n - 1`` up to ``n`` once ``n`` passes
    2^24 (every SD3 text encoder's token table), indexing one past the end.
    """
    k = min(_SAMPLES_PER_TENSOR, n)
    if k == 1:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.arange(k, dtype=torch.long, device=device) * (n - 1) // (k - 1)


def _weights_digest(module: torch.nn.Module) -> str:
    """sha256 over each parameter's name, shape, dtype and 64 evenly strided values.

    Cheap (no full pass over billions of weights); a change confined to unsampled entries is
    not seen, which retrained or differently-seeded encoders never are.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if flat.numel():
            h.update(flat[_strided_indices(flat.numel(), flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def encoder_fingerprint(pipe) -> str:
    """Hex digest identifying what ``pipe.encode_prompt`` computes: encoder configs, dtypes,
    tokenizers and a strided digest of the encoder weights. Absent encoders count as ``none``.
    """
    parts: dict[str, object] = {"tokenizer_max_length": getattr(pipe, "tokenizer_max_length", None)}
    for attr in TEXT_ENCODERS:
        enc = getattr(pipe, attr, None)
        if enc is None:
            parts[attr] = "none"
            continue
        config = enc.config.to_diff_dict() if hasattr(enc.config, "to_diff_dict") else dict(enc.config)
        config.pop("_name_or_path", None)  # where it was loaded from does not change the embeddings
        parts[attr] = {
            "class": type(enc).__name__,
            "config": config,
            "dtype": str(enc.dtype),
            "weights": _weights_digest(enc),
        }
    for attr in TOKENIZERS:
        tok = getattr(pipe, attr, None)
        parts[attr] = (
            "none"
            if tok is None
            else {
                "class": type(tok).__name__,
                "vocab": hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest(),
                "max_length": tok.model_max_length,
            }
        )
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class TextEmbeddingCache:
    """Per-prompt embeddings in memory (CPU) and, with ``cache_dir``, on disk as safetensors."""

    def __init__(self, cache_dir: Path | str | None, encoder_fingerprint: str):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        """Where entries are written (None: memory only)."""
        self.fingerprint = encoder_fingerprint
        """``encoder_fingerprint(pipe)`` of the encoders the entries come from."""
        self.hits = 0
        """Look-ups answered from memory or disk."""
        self.misses = 0
        """Look-ups that had to be encoded."""
        self._memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def key(self, prompt: str, max_sequence_length: int) -> str:
        """sha256 of fingerprint, prompt and max length (NUL-separated so fields cannot run together)."""
        raw = f"{self.fingerprint}\0{prompt}\0{int(max_sequence_length)}"
        return hashlib.sha256(raw.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / f"{key}.safetensors"

    def get(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(prompt_embeds [L, D], pooled [P])`` on CPU, or None. Counts a hit or a miss."""
        key = self.key(prompt, max_sequence_length)
        entry = self._memory.get(key)
        path = self.path(key)
        if entry is None and path is not None and path.is_file():
            tensors = load_file(str(path))
            entry = (tensors["prompt_embeds"], tensors["pooled"])
            self._memory[key] = entry
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, prompt: str, max_sequence_length: int, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Store one prompt's ``[L, D]`` and ``[P]`` embeddings (written atomically when on disk)."""
        key = self.key(prompt, max_sequence_length)
        entry = (prompt_embeds.detach().to("cpu").contiguous(), pooled.detach().to("cpu").contiguous())
        self._memory[key] = entry
        path = self.path(key)
        if path is None:
            return
        meta = {"prompt": prompt, "max_sequence_length": str(max_sequence_length), "fingerprint": self.fingerprint}
        atomic_write(path, lambda tmp: save_file({"prompt_embeds": entry[0], "pooled": entry[1]}, tmp, metadata=meta))


def encoders_device(pipe) -> torch.device:
    """Where the text encoders' weights are: the token ids must go there, whatever device the
    embeddings are wanted on (tokenizers return CPU tensors; encoders may sit on a GPU)."""
    for attr in TEXT_ENCODERS:
        enc = getattr(pipe, attr, None)
        if enc is not None:
            return next(enc.parameters()).device
    return torch.device("cpu")


def _encode(pipe, prompts: list[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    if all(getattr(pipe, attr, None) is None for attr in TEXT_ENCODERS):
        raise ApexError(
            f"prompt {prompts[0]!r} is not in the text-embedding cache and the text encoders were freed; "
            'encode every prompt (and "") before free_text_encoders(pipe)'
        )
    for attr in TEXT_ENCODERS:  # frozen encoders: no dropout (modules built in code start in train mode)
        enc = getattr(pipe, attr, None)
        if enc is not None:
            enc.eval()
    from apexcli.backbones import backbone_of_pipeline

    return backbone_of_pipeline(pipe).encode_prompt(
        pipe, prompts, max_sequence_length=max_sequence_length, device=encoders_device(pipe)
    )


@torch.no_grad()
def encode_prompts(
    pipe,
    prompts: Sequence[str],
    *,
    max_sequence_length: int,
    device: torch.device | str,
    cache: TextEmbeddingCache | None = None,
    batch_size: int = 32,
) -> PromptEmbeds:
    """``PromptEmbeds`` on ``device`` (one row per prompt, in order) from ``pipe.encode_prompt``
    (the family's encoders: SD3 CLIP-L, CLIP-G and T5, FLUX CLIP-L and T5; no CFG pair; encoders
    put in eval mode), computed on the encoders'
    own device. Encode ``[""]`` for the unconditional embedding. With a
    ``cache``, only prompts not yet cached are encoded (in batches of ``batch_size``).
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    todo: list[str] = []
    for prompt in dict.fromkeys(prompts):  # each distinct prompt looked up / encoded once
        hit = cache.get(prompt, max_sequence_length) if cache is not None else None
        if hit is None:
            todo.append(prompt)
        else:
            found[prompt] = hit
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        embeds, pooled = _encode(pipe, chunk, max_sequence_length)
        for j, prompt in enumerate(chunk):
            found[prompt] = (embeds[j], pooled[j])
            if cache is not None:
                cache.put(prompt, max_sequence_length, embeds[j], pooled[j])
    return PromptEmbeds(
        torch.stack([found[p][0].to(device) for p in prompts]),
        torch.stack([found[p][1].to(device) for p in prompts]),
    )


def move_text_encoders(pipe, device: torch.device | str) -> None:
    """Put the text encoders that ``pipe`` still holds on ``device`` (no reference kept here, so
    ``free_text_encoders`` can release them)."""
    for attr in TEXT_ENCODERS:
        if getattr(pipe, attr, None) is not None:
            getattr(pipe, attr).to(device)


def free_text_encoders(pipe) -> None:
    """Drop the three text encoders from ``pipe`` (set to None) and release their memory.

    Call after every prompt the run needs (and ``""``) went through ``encode_prompts`` with a
    cache; later misses raise an ``ApexError`` instead of encoding.
    """
    for attr in TEXT_ENCODERS:
        if getattr(pipe, attr, None) is not None:
            setattr(pipe, attr, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
