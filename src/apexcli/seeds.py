"""Seeds derived from integers: every random draw of a run (prompts, noise, sample order, probe
points) takes its generator from ``mix_seed(seed, ...)``, so it depends on its coordinates alone,
never on how many draws came before it or how many processes share the work."""

from __future__ import annotations


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix-style), stable across processes and versions."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF
