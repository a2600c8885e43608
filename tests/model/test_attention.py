"""MLA: naive == absorbed, blocked == SDPA, and cached decoding == the full forward."""
import pytest
import torch

from dsmoe.infer.cache import LatentCache
from dsmoe.model import mla
from dsmoe.model.mla import blocked_attention
from dsmoe.model.transformer import resolve_attn_impl


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_naive_equals_absorbed_full_sequence(tiny_args, build, q_lora_rank):
    model = build(tiny_args.replace(q_lora_rank=q_lora_rank))
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 24))
    with torch.no_grad():
        naive = model(tokens, attn_impl="naive")
        absorbed = model(tokens, attn_impl="absorb")
    torch.testing.assert_close(absorbed, naive, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["naive", "absorb", "auto"])
def test_cached_decoding_equals_full_forward(tiny_args, build, impl):
    model = build(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(tokens, attn_impl="naive")
        cache = LatentCache(tiny_args, batch_size=3, max_len=32)
        steps = [model(tokens[:, :7], cache, attn_impl=impl)]  # prefill a chunk
        steps.append(model(tokens[:, 7:10], cache, attn_impl=impl))  # a second chunk
        for t in range(10, 20):  # then one token at a time
            steps.append(model(tokens[:, t:t + 1], cache, attn_impl=impl))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)
    assert cache.max_length() == 20


def test_rewind_then_redecode_matches(tiny_args, build):
    model = build(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 12))
    other = torch.randint(0, tiny_args.vocab_size, (1, 3))
    with torch.no_grad():
        full = model(tokens)
        cache = LatentCache(tiny_args, batch_size=1, max_len=16)
        model(tokens[:, :9], cache)
        model(other, cache)  # a rejected draft
        cache.rewind(3)
        tail = model(tokens[:, 9:], cache)
    torch.testing.assert_close(tail, full[:, 9:], atol=2e-5, rtol=1e-4)


def test_cache_holds_only_latent_and_rope_key(tiny_args):
    cache = LatentCache(tiny_args, batch_size=2, max_len=8, n_layers=tiny_args.n_layers)
    per_token_layer = (tiny_args.kv_lora_rank + tiny_args.qk_rope_head_dim) * 4
    assert cache.bytes_per_token_per_layer() == per_token_layer
    total = cache.latent.numel() * 4 + cache.k_pe.numel() * 4
    assert total == per_token_layer * 2 * 8 * tiny_args.n_layers


def test_auto_picks_absorb_only_for_short_cached_steps():
    assert resolve_attn_impl("auto", 1, has_cache=True) == "absorb"
    assert resolve_attn_impl("auto", 1, has_cache=False) == "naive"
    assert resolve_attn_impl("auto", 512, has_cache=True) == "naive"


@pytest.mark.parametrize("T, S, masked", [(24, 24, False), (1, 9, False), (7, 20, True), (1, 9, True)])
def test_blocked_attention_equals_sdpa(tiny_args, build, T, S, masked, monkeypatch):
    """The CPU inference kernel of naive attention against SDPA on the same inputs, as the model
    calls it: causal over a whole sequence (no mask), one new token after a cache (no mask),
    and a per-row mask (a prefill chunk after cached positions, rows of different lengths);
    blocks of a few rows so that several blocks run."""
    monkeypatch.setattr(mla, "BLOCK_SCORES", 2 * tiny_args.n_heads * S)  # 1-2 query rows a block
    attn = build(tiny_args).layers[0].attn
    B, H = 2, tiny_args.n_heads
    g = torch.Generator().manual_seed(0)
    q_nope = torch.randn(B, T, H, tiny_args.qk_nope_head_dim, generator=g)
    q_pe = torch.randn(B, T, H, tiny_args.qk_rope_head_dim, generator=g)
    kv = torch.randn(B, S, H, tiny_args.qk_nope_head_dim + tiny_args.v_head_dim, generator=g)
    k_nope, v = kv.split([tiny_args.qk_nope_head_dim, tiny_args.v_head_dim], dim=-1)
    k_pe = torch.randn(B, S, tiny_args.qk_rope_head_dim, generator=g)
    mask = None
    if masked:  # row 0 has S - T cached keys before its new tokens, row 1 three fewer
        lengths = torch.tensor([S - T, S - T - 3])
        positions = lengths[:, None] + torch.arange(T)
        mask = (torch.arange(S)[None, None, :] <= positions[:, :, None]).unsqueeze(1)
    with torch.no_grad():
        blocked = attn._attend_blocked(q_nope, q_pe, k_nope, k_pe, v, mask)
        sdpa = attn._attend_sdpa(q_nope, q_pe, k_nope, k_pe, v, mask)
    assert blocked.shape == (B, T, H, tiny_args.v_head_dim)
    torch.testing.assert_close(blocked, sdpa, atol=1e-5, rtol=1e-5)


def test_blocked_attention_only_for_cpu_fp32_inference():
    x = torch.zeros(1, 2, 3)
    assert not blocked_attention(x)  # gradients on: SDPA (its backward)
    with torch.no_grad():
        assert blocked_attention(x)
        assert not blocked_attention(x.bfloat16())
