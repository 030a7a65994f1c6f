"""Text-embedding cache on the tiny pipeline: hits, misses, invalidation, safetensors on disk."""

import pytest
import torch
from safetensors import safe_open

from apexcli.errors import ApexError
from apexcli.models.text_cache import (
    TextEmbeddingCache,
    encode_prompts,
    encoder_fingerprint,
    free_text_encoders,
)
from apexcli.models.tiny import build_tiny_pipeline

PROMPTS = ["a red apple", 'a sign that says "open"']


@pytest.fixture()
def pipe():
    return build_tiny_pipeline(seed=0)


def _fresh(pipe, prompts, max_len):
    for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        enc.eval()  # T5 has dropout; modules built in code start in train mode
    with torch.no_grad():
        e, _, p, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_len
        )
    return e, p


def test_encode_without_cache_matches_the_pipeline(pipe):
    got = encode_prompts(pipe, PROMPTS + [""], max_sequence_length=16, device="cpu")
    e, p = _fresh(pipe, PROMPTS + [""], 16)
    assert torch.equal(got.prompt_embeds, e) and torch.equal(got.pooled, p)
    assert got.prompt_embeds.shape == (3, 32 + 16, 32) and got.pooled.shape == (3, 64)  # CLIP 32 + T5 16 tokens


def test_hit_miss_and_cached_equals_fresh(pipe, tmp_path):
    cache = TextEmbeddingCache(tmp_path, encoder_fingerprint(pipe))
    first = encode_prompts(pipe, PROMPTS, max_sequence_length=16, device="cpu", cache=cache)
    assert (cache.hits, cache.misses) == (0, 2)
    second = encode_prompts(pipe, PROMPTS[::-1], max_sequence_length=16, device="cpu", cache=cache)
    assert (cache.hits, cache.misses) == (2, 2)
    assert torch.equal(second.prompt_embeds, first.prompt_embeds.flip(0))
    e, p = _fresh(pipe, PROMPTS, 16)
    torch.testing.assert_close(first.prompt_embeds, e, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.pooled, p, rtol=0, atol=1e-6)
    # a repeated prompt is encoded once and fills every row that asks for it
    rep = encode_prompts(pipe, ["x", "x", PROMPTS[0]], max_sequence_length=16, device="cpu", cache=cache)
    assert (cache.hits, cache.misses) == (3, 3)
    assert torch.equal(rep.prompt_embeds[0], rep.prompt_embeds[1])


def test_entries_are_safetensors_and_survive_a_new_process(pipe, tmp_path):
    fp = encoder_fingerprint(pipe)
    encode_prompts(pipe, PROMPTS, max_sequence_length=16, device="cpu", cache=TextEmbeddingCache(tmp_path, fp))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.glob("*.tmp"))
    key = TextEmbeddingCache(tmp_path, fp).key(PROMPTS[0], 16)
    with safe_open(str(tmp_path / f"{key}.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {"prompt_embeds", "pooled"}
        assert f.metadata()["prompt"] == PROMPTS[0]
        assert f.get_tensor("prompt_embeds").shape == (48, 32)
    # a new cache object (empty memory) reads the files: no encoder needed
    reloaded = TextEmbeddingCache(tmp_path, fp)
    free_text_encoders(pipe)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None and pipe.text_encoder_3 is None
    got = encode_prompts(pipe, PROMPTS, max_sequence_length=16, device="cpu", cache=reloaded)
    assert (reloaded.hits, reloaded.misses) == (2, 0)
    e, p = _fresh(build_tiny_pipeline(seed=0), PROMPTS, 16)
    torch.testing.assert_close(got.prompt_embeds, e, rtol=0, atol=1e-6)
    with pytest.raises(ApexError, match="freed"):
        encode_prompts(pipe, ["never seen"], max_sequence_length=16, device="cpu", cache=reloaded)


def test_invalidation_by_prompt_length_and_encoder(pipe, tmp_path):
    fp = encoder_fingerprint(pipe)
    cache = TextEmbeddingCache(tmp_path, fp)
    encode_prompts(pipe, PROMPTS, max_sequence_length=16, device="cpu", cache=cache)
    encode_prompts(pipe, ["another prompt"], max_sequence_length=16, device="cpu", cache=cache)
    assert cache.misses == 3
    longer = encode_prompts(pipe, PROMPTS, max_sequence_length=24, device="cpu", cache=cache)
    assert cache.misses == 5 and longer.prompt_embeds.shape[1] == 32 + 24

    assert encoder_fingerprint(build_tiny_pipeline(seed=0)) == fp  # same weights -> same key
    other = build_tiny_pipeline(seed=1)
    other_fp = encoder_fingerprint(other)
    assert other_fp != fp
    other_cache = TextEmbeddingCache(tmp_path, other_fp)
    got = encode_prompts(other, PROMPTS, max_sequence_length=16, device="cpu", cache=other_cache)
    assert (other_cache.hits, other_cache.misses) == (0, 2)
    assert not torch.allclose(got.prompt_embeds, _fresh(pipe, PROMPTS, 16)[0])

    # fine-tuned weights (same architecture) also change the fingerprint
    with torch.no_grad():
        pipe.text_encoder_3.shared.weight.add_(0.01)
    assert encoder_fingerprint(pipe) != fp


def test_weights_digest_of_a_tensor_past_float32_precision():
    """T5-XXL's and CLIP's token embeddings have more than 2^24 values, where a float32 index
    grid rounds its last index past the end; the digest samples the last value and changes with it."""
    from apexcli.models.text_cache import _weights_digest

    module = torch.nn.Module()
    module.register_buffer("table", torch.zeros(2**25 + 4, dtype=torch.uint8))
    before = _weights_digest(module)
    module.table[-1] = 1
    assert _weights_digest(module) != before
