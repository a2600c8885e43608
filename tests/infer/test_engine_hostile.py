"""One request cannot fail the others inside the engine: a step that raises fails only the
request at fault, a request whose admission fails finishes with an error, and a long prompt
is prefilled a chunk per step while the running requests keep decoding. Every survivor's
output is compared with a run in which the failing request never existed."""
import pytest
import torch

import dsmoe.infer.engine as engine_module
import dsmoe.infer.staging as staging_module
from dsmoe.errors import DsmoeError
from dsmoe.infer.engine import Engine
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.speculative import MTPSpeculation

POISON = 13  # a prompt starting with this token makes the faulty step raise


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[t if t != POISON else POISON + 1 for t in torch.randint(0, vocab, (n,), generator=g).tolist()]
            for n in lengths]


def run(engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_work():
        engine.step()
    return reqs


def make_engine(model, speculative, **kw):
    return Engine(model, decoder=MTPSpeculation() if speculative else None, max_batch=8, **kw)


def poison_decode(engine, after_tokens=3, after_real_step=True):
    """Make a decode step raise whenever a poisoned request that has made `after_tokens`
    tokens is in the batch; `after_real_step`: only after the real step has changed the state
    (cache lengths, drafts, generators), which the engine must then undo."""
    real = engine.decoder.decode

    def decode(model, running, cache, sampling):
        poisoned = any(r.prompt_ids[0] == POISON and len(r.output_ids) >= after_tokens for r in running)
        if poisoned and not after_real_step:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        out = real(model, running, cache, sampling)
        if poisoned:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return out

    engine.decoder.decode = decode


SAMPLING = [SamplingParams(max_tokens=12), SamplingParams(max_tokens=9, temperature=0.9, seed=5),
            SamplingParams(max_tokens=14, temperature=0.7, top_p=0.8, seed=6), SamplingParams(max_tokens=7)]


@pytest.mark.parametrize("speculative, after_real_step", [(False, False), (False, True), (True, True)])
def test_a_failing_decode_step_fails_only_the_request_at_fault(tiny_args, build, speculative, after_real_step,
                                                               caplog):
    model = build(tiny_args)
    prompts = prompts_of([5, 9, 3, 7], tiny_args.vocab_size)
    clean = run(make_engine(model, speculative), prompts, SAMPLING)
    engine = make_engine(model, speculative)
    poison_decode(engine, after_real_step=after_real_step)
    bad = [POISON, 1, 2, 3]
    # the culprit sits in the middle of the batch (rows sort by prompt length)
    reqs = run(engine, prompts[:2] + [bad] + prompts[2:], SAMPLING[:2] + [SamplingParams(max_tokens=20)]
               + SAMPLING[2:])
    culprit = reqs.pop(2)
    assert culprit.finish_reason == "error" and 3 <= len(culprit.output_ids) <= 4
    assert culprit.id in culprit.error and "probability tensor" not in culprit.error  # generic to the client
    assert "probability tensor" in caplog.text and culprit.id in caplog.text  # the cause, in the log
    for got, ref in zip(reqs, clean):
        assert got.finish_reason == ref.finish_reason and got.output_ids == ref.output_ids
    assert engine.cache.n_used == 0


def test_a_passing_fault_fails_nobody(tiny_args, build):
    model = build(tiny_args)
    prompts = prompts_of([5, 9, 3], tiny_args.vocab_size, seed=1)
    clean = run(make_engine(model, True), prompts, SAMPLING[:3])
    engine = make_engine(model, True)
    real, calls = engine.decoder.decode, []

    def flaky(*args):
        calls.append(1)
        out = real(*args)
        if len(calls) == 4:
            raise RuntimeError("a passing device error")
        return out

    engine.decoder.decode = flaky
    reqs = run(engine, prompts, SAMPLING[:3])
    assert [r.output_ids for r in reqs] == [r.output_ids for r in clean]
    assert all(r.finish_reason != "error" for r in reqs)


def test_a_request_whose_admission_fails_finishes_with_an_error(tiny_args, build, monkeypatch):
    model = build(tiny_args)
    prompts = prompts_of([5, 9, 3], tiny_args.vocab_size, seed=2)
    params = [SamplingParams(max_tokens=10)] * 3
    clean = run(make_engine(model, False), prompts, params)
    engine = make_engine(model, False)
    first = [engine.add_request(p, sp) for p, sp in zip(prompts[:2], params)]
    engine.step()
    real = engine.cache.acquire

    def full(n=1):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    engine.cache.acquire = full  # the cache cannot grow
    late = engine.add_request(prompts[2], params[2])
    engine.step()
    assert late.finish_reason == "error" and "memory" in late.error and "20.00 GiB" not in late.error
    engine.cache.acquire = real
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in first] == [r.output_ids for r in clean[:2]]
    # a long prompt whose staging row cannot be had fails the same way
    monkeypatch.setattr(engine_module, "StagedPrompt", lambda *a: full())
    staged = engine.add_request(prompts_of([40], tiny_args.vocab_size)[0], SamplingParams(max_tokens=4))
    engine.prefill_chunk = 16
    engine.step()
    assert staged.finish_reason == "error" and engine.staged is None and not engine.has_work()


def test_a_joining_group_is_retried_one_by_one(tiny_args, build, monkeypatch):
    model = build(tiny_args)
    prompts = prompts_of([5, 9, 3], tiny_args.vocab_size, seed=3)
    params = [SamplingParams(max_tokens=8, temperature=0.8, seed=i) for i in range(3)]
    clean = run(make_engine(model, True), prompts, params)
    real = engine_module.prefill

    def prefill(model, prompts, *args, **kwargs):
        if any(p[0] == POISON for p in prompts):
            raise RuntimeError("bad prompt")
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(engine_module, "prefill", prefill)
    engine = make_engine(model, True)
    reqs = run(engine, prompts[:1] + [[POISON, 4]] + prompts[1:], params[:1] + [params[0]] + params[1:])
    assert reqs.pop(1).finish_reason == "error"
    assert [r.output_ids for r in reqs] == [r.output_ids for r in clean]
    assert engine.cache.n_used == engine.decoder.cache.n_used == 0


def test_failing_text_or_callback_costs_only_its_request(tiny_args, build, tokenizer):
    model = build(tiny_args)
    prompts = [tokenizer.encode("ab", add_bos=True), tokenizer.encode("cd", add_bos=True)]
    params = [SamplingParams(max_tokens=8, ignore_eos=True)] * 2
    clean = run(Engine(model, tokenizer), prompts, params)
    engine = Engine(model, tokenizer)
    victim = engine.add_request(prompts[0], params[0])
    other = engine.add_request(prompts[1], params[1])
    engine.step()
    victim.detokenizer.tokenizer = None  # decoding its next tokens raises
    while engine.has_work():
        engine.step()
    assert victim.finish_reason == "error" and other.output_ids == clean[1].output_ids

    def explode(ev):
        raise ValueError("a callback that fails")

    engine = Engine(model, tokenizer)
    loud = engine.add_request(prompts[0], params[0], on_event=explode)
    other = engine.add_request(prompts[1], params[1])
    while engine.has_work():
        engine.step()
    assert loud.finish_reason == "abort" and other.output_ids == clean[1].output_ids


@pytest.mark.parametrize("speculative", [False, True])
def test_a_long_prompt_is_prefilled_between_decode_steps(tiny_args, build, speculative):
    model = build(tiny_args)
    short = prompts_of([4, 6], tiny_args.vocab_size, seed=4)
    long = prompts_of([70], tiny_args.vocab_size, seed=5)[0]
    params = [SamplingParams(max_tokens=30), SamplingParams(max_tokens=30, temperature=0.9, seed=2)]
    long_params = SamplingParams(max_tokens=6, temperature=0.8, seed=9)
    ref = make_engine(model, speculative, chunked_prefill=False, prefill_chunk=16)
    ref_reqs = run(ref, short + [long], params + [long_params])
    engine = make_engine(model, speculative, prefill_chunk=16)
    running = [engine.add_request(p, sp) for p, sp in zip(short, params)]
    engine.step()
    staged = engine.add_request(long, long_params)
    steps_while_staged = []
    while not staged.output_ids:
        events = engine.step()
        steps_while_staged.append({ev.request.id for ev in events if ev.token_ids})
    assert len(steps_while_staged) == 5  # ceil(70 / 16) chunks, one per step
    assert all({r.id for r in running} <= ids for ids in steps_while_staged)  # the streams kept flowing
    while engine.has_work():
        engine.step()
    for got, want in zip(running + [staged], ref_reqs):
        assert got.output_ids == want.output_ids
    assert engine.staged is None and engine.cache.n_used == 0


def test_a_staged_prompt_can_be_aborted_or_fail_alone(tiny_args, build, monkeypatch):
    model = build(tiny_args)
    engine = make_engine(model, False, prefill_chunk=8)
    keep = engine.add_request([1, 2, 3], SamplingParams(max_tokens=12))
    gone = engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=4))
    engine.step()
    assert engine.staged.request is gone
    engine.abort(gone.id)
    engine.step()
    assert gone.finish_reason == "abort" and engine.staged is None
    monkeypatch.setattr(staging_module, "prefill_part", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    bad = engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=4))
    engine.step()
    assert bad.finish_reason == "error" and engine.staged is None
    while engine.has_work():
        engine.step()
    alone = Engine(model).generate([[1, 2, 3]], SamplingParams(max_tokens=12))[0]
    assert keep.output_ids == alone.output_ids


@pytest.mark.parametrize("field, value", [("temperature", 1e-40), ("temperature", float("inf")),
                                          ("temperature", float("nan")), ("top_p", 1e-50), ("top_p", 0.0),
                                          ("top_k", 2 ** 63), ("seed", 2 ** 70), ("seed", -(2 ** 63) - 1)])
def test_the_engine_refuses_values_sampling_cannot_use(tiny_args, build, field, value):
    engine = Engine(build(tiny_args))
    with pytest.raises(DsmoeError, match=field):
        engine.add_request([1, 2], SamplingParams(max_tokens=4, **{"temperature": 1.0, field: value}))
    assert not engine.has_work()
    ok = SamplingParams(max_tokens=4, temperature=1e-3, top_p=1e-6, seed=2 ** 64 - 1, top_k=2 ** 62)
    assert len(engine.generate([[1, 2]], ok)[0].output_ids) == 4  # the edges of each range still run
