"""LatentCache: rows that come and go, exact memory, and the model seeing the same thing."""
import pytest
import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache
from dsmoe.infer.engine import Engine
from dsmoe.infer.sampling import SamplingParams


def held_bytes(obj) -> int:
    """Bytes of every tensor storage an object holds (measured, not computed from its config)."""
    seen, total = set(), 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_costs_latent_plus_rope_key_per_token_per_layer(tiny_args, dtype):
    per_token_layer = (tiny_args.kv_lora_rank + tiny_args.qk_rope_head_dim) * dtype.itemsize
    cache = LatentCache(tiny_args, 0, max_len=40, n_layers=tiny_args.n_layers, dtype=dtype)
    assert cache.bytes_per_token_per_layer() == per_token_layer
    cache.acquire(3)  # grows to 4 rows
    tokens = cache.capacity * cache.max_len * tiny_args.n_layers
    row_lengths = cache.capacity * 8  # one int64 length per row, on the host
    assert held_bytes(cache) == tokens * per_token_layer + row_lengths
    assert cache.nbytes() == tokens * per_token_layer


def test_engine_cache_memory_follows_requests(tiny_args, build):
    model = build(tiny_args)
    engine = Engine(model, max_batch=8, max_len=64)
    per_row = (tiny_args.kv_lora_rank + tiny_args.qk_rope_head_dim) * 4 * 64 * tiny_args.n_layers
    assert engine.cache.nbytes() == 0
    reqs = [engine.add_request([1, 2, 3], SamplingParams(max_tokens=n)) for n in (3, 6, 6)]
    engine.step()  # prefill (first token) and one decode step
    assert engine.cache.n_used == 3 and engine.cache.nbytes() == 4 * per_row  # 3 requests, 4 rows
    engine.step()
    assert reqs[0].finished and len(reqs[0].output_ids) == 3
    assert engine.cache.n_used == 2 and engine.cache.nbytes() == 4 * per_row
    while engine.has_work():
        engine.step()
    assert engine.cache.n_used == 0 and engine.cache.nbytes() == 0  # freed when they end


def test_release_moves_the_last_row_and_keeps_its_contents(tiny_args, build):
    model = build(tiny_args)
    cache = LatentCache(tiny_args, 0, max_len=32, n_layers=tiny_args.n_layers)
    rows = cache.acquire(3)
    tokens = torch.randint(0, tiny_args.vocab_size, (3, 10))
    with torch.no_grad():
        model(tokens, cache.rows(rows.start, rows.stop))
        moved = cache.release(0)  # row 2 moves into row 0
        assert moved == 2 and cache.n_used == 2
        nxt = torch.randint(0, tiny_args.vocab_size, (2, 1))
        step = model(nxt, cache.rows(0, 2), attn_impl="absorb")
        ref = model(torch.cat([tokens[[2, 1]], nxt], dim=1))[:, -1:]
    torch.testing.assert_close(step, ref, atol=2e-5, rtol=1e-4)


def test_views_of_a_pool_decode_like_separate_caches(tiny_args, build):
    model = build(tiny_args)
    cache = LatentCache(tiny_args, 0, max_len=32, n_layers=tiny_args.n_layers)
    a, b = torch.randint(0, tiny_args.vocab_size, (1, 7)), torch.randint(0, tiny_args.vocab_size, (1, 4))
    with torch.no_grad():
        first = cache.acquire(1)
        model(a, cache.rows(first.start, first.stop))
        second = cache.acquire(1)  # joins later, with a shorter history
        model(b, cache.rows(second.start, second.stop))
        assert cache.lengths[:2].tolist() == [7, 4]
        nxt = torch.randint(0, tiny_args.vocab_size, (2, 1))
        both = model(nxt, cache.rows(0, 2), attn_impl="absorb")[:, 0]
        ref_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        ref_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(both, torch.cat([ref_a, ref_b]), atol=2e-5, rtol=1e-4)


def test_per_row_rewind_and_errors(tiny_args):
    cache = LatentCache(tiny_args, 2, max_len=8, n_layers=1)
    cache.positions(5)
    cache.advance(5)
    cache.rewind(torch.tensor([1, 3]))
    assert cache.lengths.tolist() == [4, 2] and cache.max_length() == 4
    with pytest.raises(DsmoeError, match="cannot rewind"):
        cache.rewind([5, 0])
    with pytest.raises(DsmoeError, match="holds 8 positions"):
        cache.positions(5)
    with pytest.raises(DsmoeError, match="not in use"):
        cache.release(2)
    limited = LatentCache(tiny_args, 0, max_len=8, n_layers=1, max_rows=2)
    limited.acquire(2)
    with pytest.raises(DsmoeError, match="at most 2 requests"):
        limited.acquire(1)
