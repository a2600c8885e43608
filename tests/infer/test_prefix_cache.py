"""The prefix cache in the engine: the same greedy output with and without it (several prefix
lengths, RAM and disk, across a restart), misses for corrupt files and other models, LRU
eviction under both budgets, shared prefixes in flight together, bad directories and sizes."""
import threading

import pytest
import torch

from dsmoe.errors import ConfigError, DsmoeError
from dsmoe.infer import prefix_disk
from dsmoe.infer.engine import Engine
from dsmoe.infer.prefix_cache import PrefixCache, block_keys, model_identity, parse_budget
from dsmoe.infer.sampling import SamplingParams

BLOCK = 8
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture
def model(tiny_args, build):
    return build(tiny_args)


def tokens(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def outputs(engine: Engine, prompts: list[list[int]], params=GREEDY) -> list[list[int]]:
    return [r.output_ids for r in engine.generate(prompts, params)]


def make_cache(model, tokenizer_id: str = "bytes", **kw) -> PrefixCache:
    kw.setdefault("ram_bytes", 10**7)
    return PrefixCache(model_identity(model, tokenizer_id), block=BLOCK, **kw)


def test_greedy_output_is_the_same_at_several_prefix_lengths(model):
    shared = tokens(90)
    prompts = [shared[:n] + tokens(5, seed=n) for n in (1, 7, 8, 9, 16, 31, 40, 64, 85)]
    plain = outputs(Engine(model), prompts)
    cache = make_cache(model)
    engine = Engine(model, prefix_cache=cache)
    outputs(engine, [shared])  # warm: the shared prefix's full blocks
    for p, want in zip(prompts, plain):  # one at a time: each reuses what the ones before left
        req = engine.generate([p], GREEDY)[0]
        assert req.output_ids == want
        assert req.cached_tokens % BLOCK == 0 and req.cached_tokens >= (min(len(p) - 5, 90) // BLOCK) * BLOCK
        assert req.cached_tokens <= len(p) - 1  # the last prompt token is always prefilled
    assert cache.stats()["ram_hit_tokens"] > 0
    # prefilled in other chunks, the cached rows still hold the same latents as a plain prefill
    again = engine.generate([prompts[-1]], SamplingParams(max_tokens=1))[0]
    assert again.cached_tokens == 88
    assert engine.stats.prefill_tokens < sum(len(p) for p in prompts)


def prefilled_row(engine: Engine, prompt: list[int]) -> tuple[torch.Tensor, int]:
    """Every layer's latents and k_pe of `prompt` once admitted, and how many were cached."""
    req = engine.add_request(prompt, SamplingParams(max_tokens=5))
    engine.step()
    return engine.cache.read_row(engine.running.index(req), 0, len(prompt)), req.cached_tokens


def test_cached_latents_equal_a_fresh_prefill(model):
    prompt = tokens(70)
    engine = Engine(model, prefix_cache=make_cache(model))
    outputs(engine, [prompt[:50]])
    blocks = engine.prefix_cache.match(prompt)
    assert len(blocks) == 6  # the first 48 tokens
    fresh, _ = prefilled_row(Engine(model), prompt)
    torch.testing.assert_close(torch.cat(blocks, dim=1), fresh[:, :48])
    # the rest, prefilled over the copied blocks: every layer sees the same past
    reused, cached = prefilled_row(engine, prompt)
    assert cached == 48
    torch.testing.assert_close(reused, fresh)


def test_disk_tier_survives_a_restart_and_gives_the_same_output(model, tmp_path):
    prompts = [tokens(60), tokens(60)[:40] + tokens(10, seed=9)]
    plain = outputs(Engine(model), prompts)
    first = make_cache(model, disk_dir=tmp_path)
    assert outputs(Engine(model, prefix_cache=first), prompts[:1]) == plain[:1]
    first.flush()
    assert first.stats()["disk_blocks"] == (60 + 6 - 1) // BLOCK
    restarted = make_cache(model, disk_dir=tmp_path)  # a new process: RAM empty
    engine = Engine(model, prefix_cache=restarted)
    reqs = engine.generate(prompts, GREEDY)
    assert [r.output_ids for r in reqs] == plain
    assert [r.cached_tokens for r in reqs] == [56, 40]
    # the first prompt reads the disk and promotes its blocks to RAM, where the second finds them
    assert restarted.stats()["disk_hit_tokens"] == 56 and restarted.stats()["ram_hit_tokens"] == 40
    # with the RAM tier off, the disk alone serves
    disk_only = make_cache(model, disk_dir=tmp_path, ram_bytes=0)
    assert outputs(Engine(model, prefix_cache=disk_only), prompts) == plain
    assert disk_only.stats()["ram_blocks"] == 0
    assert disk_only.stats()["disk_hit_tokens"] == 104  # 56 and 48: the restarted run stored 40..48


def test_corrupt_truncated_or_misplaced_files_are_misses(model, tmp_path):
    prompt = tokens(60)
    want = outputs(Engine(model), [prompt])
    writer = make_cache(model, disk_dir=tmp_path)
    outputs(Engine(model, prefix_cache=writer), [prompt])
    writer.flush()
    keys = block_keys(writer.namespace, prompt, BLOCK, 7)
    paths = [writer.disk.path(k) for k in keys]
    raw = bytearray(paths[5].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in block 5's latents
    paths[5].write_bytes(bytes(raw))
    assert prefix_disk.decode_block(bytes(raw), writer.namespace, keys[5], tuple(prompt[40:48]),
                                    writer.shape, writer.dtype) is None
    reader = make_cache(model, disk_dir=tmp_path)
    engine = Engine(model, prefix_cache=reader)
    req = engine.generate([prompt], GREEDY)[0]
    assert req.output_ids == want[0] and req.cached_tokens == 40 and reader.disk.corrupt == 1
    reader.flush()  # block 5 was removed, then written again from the fresh prefill
    assert Engine(model, prefix_cache=make_cache(model, disk_dir=tmp_path)).generate(
        [prompt], GREEDY)[0].cached_tokens == 56
    paths[2].write_bytes(paths[2].read_bytes()[:-100])  # truncated
    paths[4].write_bytes(paths[3].read_bytes())  # a valid file under another block's name
    third = make_cache(model, disk_dir=tmp_path)
    req = Engine(model, prefix_cache=third).generate([prompt], GREEDY)[0]
    assert req.output_ids == want[0] and req.cached_tokens == 16 and third.disk.corrupt == 1


def test_a_cache_from_another_model_or_tokenizer_is_never_used(model, tiny_args, build, tmp_path):
    prompt = tokens(50)
    writer = make_cache(model, disk_dir=tmp_path)
    outputs(Engine(model, prefix_cache=writer), [prompt])
    writer.flush()
    other = build(tiny_args, seed=1)
    for cache, m in [(make_cache(other, disk_dir=tmp_path), other),  # other weights
                     (make_cache(model, "another tokenizer", disk_dir=tmp_path), model),
                     (make_cache(model, disk_dir=tmp_path), model.to(torch.bfloat16))]:  # another dtype
        req = Engine(m, prefix_cache=cache).generate([prompt], GREEDY)[0]
        assert req.cached_tokens == 0 and req.output_ids == outputs(Engine(m), [prompt])[0]
        assert cache.namespace != writer.namespace
    assert model_identity(other, "bytes") != model_identity(model.float(), "bytes")


def test_ram_budget_evicts_least_recently_used_tails_first(model):
    probe = make_cache(model)
    probe.attach(Engine(model).cache)
    block_bytes = probe.bytes_per_token() * BLOCK
    assert probe.bytes_per_token() == 3 * (32 + 8) * 4  # layers x (kv_lora_rank + qk_rope) x fp32
    cache = make_cache(model, ram_bytes=6 * block_bytes)
    engine = Engine(model, prefix_cache=cache)
    a, b = tokens(41, seed=1), tokens(41, seed=2)
    outputs(engine, [a], SamplingParams(max_tokens=1))  # 5 blocks of a
    outputs(engine, [b], SamplingParams(max_tokens=1))  # 5 of b: a's oldest go
    assert cache.ram_bytes <= 6 * block_bytes and len(cache.ram) == 6
    assert len(cache.match(b)) == 5
    assert len(cache.match(a)) == 1  # a's first block was matched last, so kept longest
    with pytest.raises(ConfigError, match="block"):
        PrefixCache("x", block=0)


def test_disk_budget_keeps_the_directory_within_it(model, tmp_path):
    cache = make_cache(model, disk_dir=tmp_path, disk_bytes=10**9)
    outputs(Engine(model, prefix_cache=cache), [tokens(17)], SamplingParams(max_tokens=1))
    cache.flush()
    file_bytes = cache.disk.bytes // cache.disk.files
    small = make_cache(model, disk_dir=tmp_path, disk_bytes=5 * file_bytes)
    engine = Engine(model, prefix_cache=small)
    for seed in range(2, 6):
        outputs(engine, [tokens(33, seed)], SamplingParams(max_tokens=1))
        small.flush()
        on_disk = sum(p.stat().st_size for p in tmp_path.glob("*/*.blk"))
        assert on_disk <= 5 * file_bytes and small.disk.bytes == on_disk


def test_requests_sharing_a_prefix_in_flight_together(model):
    shared = tokens(48)
    prompts = [shared + tokens(3 + i, seed=10 + i) for i in range(6)]
    plain = outputs(Engine(model), prompts)
    engine = Engine(model, max_batch=4, prefix_cache=make_cache(model))
    reqs = [engine.add_request(p, GREEDY) for p in prompts[:3]]
    engine.step()  # three admitted together: all miss, all prefill
    reqs += [engine.add_request(p, GREEDY) for p in prompts[3:]]
    done = threading.Event()

    def add_from_another_thread():
        reqs.append(engine.add_request(prompts[0], GREEDY))
        done.set()

    threading.Thread(target=add_from_another_thread).start()
    done.wait(5)
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.output_ids for r in reqs] == plain + plain[:1]
    assert [r.cached_tokens for r in reqs[:3]] == [0, 0, 0]
    assert all(r.cached_tokens == 48 for r in reqs[3:])


def test_speculative_decoding_bypasses_the_prefix_cache(model):
    engine = Engine(model, speculative=True, prefix_cache=make_cache(model))
    assert engine.prefix_cache is None
    req = engine.generate([tokens(30)], GREEDY)[0]
    assert req.cached_tokens == 0 and req.output_ids == outputs(Engine(model), [tokens(30)])[0]


def test_a_directory_that_cannot_be_written_is_a_clear_error(model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DsmoeError, match="prefix-cache-dir"):
        Engine(model, prefix_cache=make_cache(model, disk_dir=blocker / "cache"))


def test_a_full_disk_costs_the_disk_tier_only(model, tmp_path, monkeypatch):
    def full(path, data, error=DsmoeError):
        raise error(f"cannot write {path}: No space left on device")

    cache = make_cache(model, disk_dir=tmp_path)
    engine = Engine(model, prefix_cache=cache)
    monkeypatch.setattr(prefix_disk, "write_file", full)
    prompt = tokens(40)
    assert outputs(engine, [prompt]) == outputs(Engine(model), [prompt])
    cache.flush()
    assert cache.disk.write_errors == 5 and cache.disk.files == 0
    assert engine.generate([prompt], GREEDY)[0].cached_tokens == 32  # the RAM tier still serves


def test_two_servers_sharing_a_directory(model, tmp_path):
    prompt = tokens(64)
    want = outputs(Engine(model), [prompt])
    caches = [make_cache(model, disk_dir=tmp_path) for _ in range(2)]
    engines = [Engine(model, prefix_cache=c) for c in caches]
    results = [None, None]

    def serve(i):
        results[i] = outputs(engines[i], [prompt])

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in caches:
        c.flush()
    assert results == [want, want]
    assert not list(tmp_path.glob("*/.*"))  # no temporaries left behind
    third = make_cache(model, disk_dir=tmp_path)
    req = Engine(model, prefix_cache=third).generate([prompt], GREEDY)[0]
    assert req.output_ids == want[0] and req.cached_tokens == 56 and third.disk.corrupt == 0


def test_budgets_are_sizes():
    assert parse_budget("512MB", "--prefix-cache-ram") == 512 * 10**6
    assert parse_budget("2GiB", "--prefix-cache-ram") == 2 * 2**30
    assert parse_budget("0", "--prefix-cache-ram") == 0
    for bad in ("lots", "-5MB", "12 parsecs", ""):
        with pytest.raises(ConfigError, match="--prefix-cache-disk"):
            parse_budget(bad, "--prefix-cache-disk")


def test_the_next_turn_finds_the_previous_output(model):
    first = tokens(30)
    engine = Engine(model, prefix_cache=make_cache(model))
    reply = engine.generate([first], SamplingParams(max_tokens=20, ignore_eos=True))[0].output_ids
    turn = first + reply + tokens(6, seed=5)  # stored at the end: positions 0..48 (the last token never ran)
    req = engine.generate([turn], GREEDY)[0]
    assert req.cached_tokens == 48  # beyond the first prompt's 24: blocks written by decode steps
    assert req.output_ids == outputs(Engine(model), [turn])[0]


def test_a_failing_store_does_not_fail_the_request(model, monkeypatch):
    cache = make_cache(model)
    engine = Engine(model, prefix_cache=cache)

    def broken(*_args, **_kw):
        raise RuntimeError("out of host memory")

    monkeypatch.setattr(cache, "store", broken)
    prompt = tokens(40)
    assert outputs(engine, [prompt]) == outputs(Engine(model), [prompt])
    assert not engine.running and cache.stats()["ram_blocks"] == 0
