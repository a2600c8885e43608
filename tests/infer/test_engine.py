"""The engine against the plain full forward: batching, chunked prefill, continuous batching,
streaming, stops, seeds, aborts and bad requests."""
import pytest
import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache
from dsmoe.infer.engine import Engine
from dsmoe.infer.forward import decode_step, prefill
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.speculative import MTPSpeculation


@torch.no_grad()
def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence through the model every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_batched_greedy_equals_full_forward(tiny_args, build):
    model = build(tiny_args)
    prompts = prompts_of([3, 17, 9, 30], tiny_args.vocab_size)
    engine = Engine(model, max_batch=4, prefill_chunk=8)  # prompts span up to 4 chunks
    reqs = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, req in zip(prompts, reqs):
        assert req.output_ids == reference_greedy(model, prompt, 12)
        assert req.finish_reason == "length"


@pytest.mark.parametrize("n_new", [1, 2, 5])
def test_decode_over_the_cache_equals_the_full_forward(tiny_args, build, n_new):
    """The engine's decode path (absorbed attention over the latent cache, the few-token
    experts) gives the logits the plain full forward (naive attention, grouped experts, no
    cache) gives at the same positions, for rows of different lengths."""
    model = build(tiny_args)
    prompts = prompts_of([14, 9, 3], tiny_args.vocab_size, seed=2)
    new = torch.randint(0, tiny_args.vocab_size, (3, n_new))
    cache = LatentCache(tiny_args, 0, 32, n_layers=tiny_args.n_layers)
    rows = cache.acquire(3)
    with torch.no_grad():
        prefill(model, prompts, cache, rows, 8)
        if n_new == 1:
            ours = decode_step(model, new, cache.rows(0, 3))[:, None]
        else:
            h, _ = model.hidden(new, cache.rows(0, 3), attn_impl="absorb")
            ours = model.logits(h)
    assert cache.lengths[:3].tolist() == [14 + n_new, 9 + n_new, 3 + n_new]
    for b, prompt in enumerate(prompts):
        full = model.run(torch.tensor([prompt + new[b].tolist()]), attn_impl="naive")
        torch.testing.assert_close(ours[b], full.logits[0, -n_new:], atol=2e-5, rtol=1e-4)


def test_chunked_prefill_equals_one_pass(tiny_args, build):
    model = build(tiny_args)
    prompts = prompts_of([40, 23, 5], tiny_args.vocab_size)
    outs = []
    for chunk in (7, 64):
        cache = LatentCache(tiny_args, 0, 64, n_layers=tiny_args.n_layers)
        rows = cache.acquire(3)
        with torch.no_grad():
            logits, hidden = prefill(model, prompts, cache, rows, chunk, keep_hidden=True)
        outs.append((logits, hidden, cache.lengths[:3].tolist()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)
    for b, p in enumerate(prompts):  # hidden states are compared where the prompt is
        torch.testing.assert_close(outs[0][1][b, :len(p)], outs[1][1][b, :len(p)], atol=2e-5, rtol=1e-4)
    assert outs[0][2] == outs[1][2] == [40, 23, 5]
    with torch.no_grad():
        full = model(torch.tensor([prompts[1]]))[0, -1]
    torch.testing.assert_close(outs[0][0][1], full, atol=2e-5, rtol=1e-4)


def test_prefill_of_the_last_positions_alone_equals_every_position(tiny_args, build):
    """Without `keep_hidden` the last block computes each prompt's last position alone (rows
    ending in different chunks); the logits and the cache are those of the full prefill."""
    model = build(tiny_args)
    prompts = prompts_of([40, 23, 5], tiny_args.vocab_size, seed=3)
    outs = []
    for keep in (True, False):
        cache = LatentCache(tiny_args, 0, 64, n_layers=tiny_args.n_layers)
        rows = cache.acquire(3)
        with torch.no_grad():
            logits, _ = prefill(model, prompts, cache, rows, 16, keep_hidden=keep)
        outs.append((logits, cache))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-4)
    assert outs[0][1].lengths[:3].tolist() == outs[1][1].lengths[:3].tolist() == [40, 23, 5]
    assert torch.equal(outs[0][1].latent, outs[1][1].latent) and torch.equal(outs[0][1].k_pe, outs[1][1].k_pe)


def test_requests_joining_a_running_batch_decode_as_if_alone(tiny_args, build):
    model = build(tiny_args)
    prompts = prompts_of([6, 11, 4, 8, 14], tiny_args.vocab_size, seed=1)
    engine = Engine(model, max_batch=3)  # more requests than rows: some wait, then join
    params = [SamplingParams(max_tokens=n) for n in (4, 9, 6, 10, 5)]
    first = [engine.add_request(p, sp) for p, sp in zip(prompts[:2], params[:2])]
    engine.step()
    engine.step()
    later = [engine.add_request(p, sp) for p, sp in zip(prompts[2:], params[2:])]
    seen_batches = set()
    while engine.has_work():
        engine.step()
        seen_batches.add(len(engine.running))
    assert max(seen_batches) == 3
    for prompt, sp, req in zip(prompts, params, first + later):
        assert req.output_ids == reference_greedy(model, prompt, sp.max_tokens)


def test_streamed_text_is_the_final_text_and_stops_are_applied(tiny_args, build, tokenizer):
    model = build(tiny_args)
    engine = Engine(model, tokenizer)
    prompt = tokenize_prompt(tokenizer, "Hello")
    free = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    text = tokenizer.decode(free.output_ids)
    assert free.text == text
    # a stop string taken from the middle of that text: the output ends right before it
    stop = text[5:8]
    assert text.find(stop) >= 3
    events = list(engine.stream(prompt, SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True)))
    streamed = "".join(ev.text for ev in events)
    final = events[-1].request
    assert streamed == final.text == text[:text.find(stop)]
    assert final.finish_reason == "stop" and events[-1].finished
    assert all(stop not in "".join(e.text for e in events[:i]) for i in range(len(events)))
    # a stop token: output ends with it and its text is not shown
    stop_id = free.output_ids[4]
    req = engine.generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=[stop_id]))[0]
    first = free.output_ids.index(stop_id)
    assert req.output_ids == free.output_ids[:first + 1] and req.finish_reason == "stop"
    assert req.text == tokenizer.decode(free.output_ids[:first])


def test_eos_stops_unless_ignored(tiny_args, build, tokenizer):
    model = build(tiny_args)
    prompt = tokenize_prompt(tokenizer, "x")
    free = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    tokenizer.eos_id = free.output_ids[2]  # a tokenizer whose EOS the model says third
    engine = Engine(model, tokenizer)
    stopped = engine.generate([prompt], SamplingParams(max_tokens=5))[0]
    assert stopped.output_ids == free.output_ids[:3] and stopped.finish_reason == "stop"
    assert stopped.text == tokenizer.decode(free.output_ids[:2])
    ignored = engine.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert ignored.output_ids == free.output_ids and ignored.finish_reason == "length"


def test_streaming_yields_each_token_as_it_is_made(tiny_args, build):
    model = build(tiny_args)
    engine = Engine(model)
    events = list(engine.stream([5, 6, 7], SamplingParams(max_tokens=6)))
    assert [len(ev.token_ids) for ev in events] == [1] * 6
    assert [ev.finished for ev in events] == [False] * 5 + [True]
    assert sum((ev.token_ids for ev in events), []) == reference_greedy(model, [5, 6, 7], 6)


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_args, build):
    model = build(tiny_args)
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = Engine(model).generate([[1, 2, 3]], sp)[0].output_ids
    others = [SamplingParams(max_tokens=7, temperature=0.8, seed=s) for s in (1, 2)]
    mixed = Engine(model).generate([[9, 9], [1, 2, 3], [4]], [others[0], sp, others[1]])[1].output_ids
    assert alone == mixed
    other_seed = Engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=1.0, seed=12))
    assert other_seed[0].output_ids != alone


def test_abort_frees_the_row(tiny_args, build):
    model = build(tiny_args)
    engine = Engine(model)
    keep = engine.add_request([1, 2], SamplingParams(max_tokens=8))
    drop = engine.add_request([3, 4], SamplingParams(max_tokens=50))
    queued = engine.add_request([5], SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(drop.id)
    engine.abort(queued.id)
    engine.step()
    assert drop.finish_reason == queued.finish_reason == "abort"
    assert engine.cache.n_used == 1 and engine.running == [keep]
    while engine.has_work():
        engine.step()
    assert keep.output_ids == reference_greedy(model, [1, 2], 8)
    assert engine.cache.n_used == 0


def test_bad_requests_fail_before_any_work(tiny_args, build):
    model = build(tiny_args)
    engine = Engine(model, max_len=64)
    with pytest.raises(DsmoeError, match="prompt is empty"):
        engine.add_request([])
    with pytest.raises(DsmoeError, match=r"in \[0, 512\)"):
        engine.add_request([1, 512])
    with pytest.raises(DsmoeError, match="context is 64 tokens"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(DsmoeError, match="max_tokens"):
        engine.add_request([1], SamplingParams(max_tokens=0))
    with pytest.raises(DsmoeError, match="need a tokenizer"):
        engine.add_request([1], SamplingParams(max_tokens=5, stop=["x"]))
    with pytest.raises(DsmoeError, match="n_mtp_layers=0"):
        Engine(build(tiny_args.replace(n_mtp_layers=0)), decoder=MTPSpeculation())
    assert not engine.has_work()


def test_a_failed_prefill_fails_its_request_alone_and_the_engine_goes_on(tiny_args, build, monkeypatch):
    import dsmoe.infer.engine as engine_module

    model = build(tiny_args)
    engine = Engine(model, decoder=MTPSpeculation())
    running = engine.add_request([1, 2, 3], SamplingParams(max_tokens=20))
    engine.step()
    joining = engine.add_request([4, 5], SamplingParams(max_tokens=20))
    real = engine_module.prefill

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine_module, "prefill", broken)
    engine.step()  # fails inside the prefill of the joining request: that request alone fails
    assert joining.finish_reason == "error" and joining.id in joining.error and "device lost" not in joining.error
    assert not running.finished and engine.cache.n_used == engine.decoder.cache.n_used == 1
    monkeypatch.setattr(engine_module, "prefill", real)
    while engine.has_work():
        engine.step()
    assert running.output_ids == reference_greedy(model, [1, 2, 3], 20)
    assert engine.cache.n_used == engine.decoder.cache.n_used == 0
    # after an error the engine itself cannot place, fail_all finishes everything and frees every row
    held = engine.add_request([1, 2, 3], SamplingParams(max_tokens=20))
    engine.step()
    engine.fail_all("device lost")
    assert held.finish_reason == "error" and engine.cache.n_used == engine.decoder.cache.n_used == 0
    again = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=6))[0]
    assert again.output_ids == reference_greedy(model, [1, 2, 3], 6)


def test_decode_threads_default_and_override(monkeypatch):
    """Decode steps run under DSMOE_DECODE_THREADS torch threads (1 by default); the
    caller's count is restored afterwards."""
    from dsmoe.errors import DsmoeError
    from dsmoe.infer.decoding import decode_thread_count, decode_threads
    monkeypatch.delenv("DSMOE_DECODE_THREADS", raising=False)
    assert decode_threads() == 1
    before = torch.get_num_threads()
    with decode_thread_count(torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    monkeypatch.setenv("DSMOE_DECODE_THREADS", "2")
    assert decode_threads() == 2
    monkeypatch.setenv("DSMOE_DECODE_THREADS", "zero")
    with pytest.raises(DsmoeError, match="DSMOE_DECODE_THREADS"):
        decode_threads()


def test_compile_without_a_compiler_warns_and_decodes_eagerly(monkeypatch):
    import dsmoe.infer.decoding as decoding
    monkeypatch.setattr(decoding.shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert decoding.PlainDecoding(compile=True).step_fn is decoding.decode_step


@pytest.mark.slow
def test_compiled_decoding_equals_eager(tiny_args, build, tmp_path, monkeypatch):
    """The compiled step (inductor, cached under TORCHINDUCTOR_CACHE_DIR) gives plain greedy's tokens."""
    import shutil
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler for inductor's CPU backend")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = build(tiny_args.replace(n_mtp_layers=0))
    prompts = [[1, 2, 3, 4], [5, 6]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    eager = [r.output_ids for r in Engine(model, max_batch=2).generate(prompts, params)]
    compiled = [r.output_ids for r in Engine(model, max_batch=2, compile=True).generate(prompts, params)]
    assert compiled == eager
