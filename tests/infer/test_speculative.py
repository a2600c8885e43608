"""Self-speculative decoding with the MTP module: greedy output identical to plain greedy,
the acceptance rule samples from the target distribution, the MTP cache stays consistent."""
import pytest
import torch

from dsmoe.infer.engine import Engine
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.speculative import MTPSpeculation, accept


def prompts_of(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


# mix: about 40%, 85% and 0% of drafts accepted; depth: drafts per step (a chain beyond 1)
@pytest.mark.parametrize("mix,depth", [(1.0, 1), (0.3, 1), (10.0, 1), (0.3, 3), (1.0, 2)])
def test_greedy_speculative_equals_plain_greedy(tiny_args, agreeing_model, mix, depth):
    model = agreeing_model(tiny_args, mix)
    prompts = prompts_of([4, 19, 9, 33, 12], tiny_args.vocab_size)
    params = [SamplingParams(max_tokens=n) for n in (20, 25, 7, 30, 1)]
    plain = Engine(model, max_batch=3).generate(prompts, params)
    engine = Engine(model, max_batch=3, decoder=MTPSpeculation(depth), prefill_chunk=8)
    spec = engine.generate(prompts, params)
    for a, b in zip(plain, spec):
        assert b.output_ids == a.output_ids and b.finish_reason == a.finish_reason
    if mix < 10:
        assert engine.stats.accepted > 0 and engine.stats.accepted < engine.stats.drafted
    assert engine.cache.n_used == engine.decoder.cache.n_used == 0


@pytest.mark.parametrize("depth", [1, 3])
def test_mtp_cache_stays_consistent_with_accepted_tokens(tiny_args, build, depth):
    """Mid-generation, the next draft's distribution equals the draft head over the MTP block of
    a fresh full forward over the sequence so far: rejected drafts, and a chain's drafted
    positions, left nothing behind in either cache."""
    model = build(tiny_args)  # random: its MTP block's attention weighs as much as its input
    engine = Engine(model, decoder=MTPSpeculation(depth), prefill_chunk=8)
    prompts = prompts_of([13, 6], tiny_args.vocab_size, seed=3)
    reqs = [engine.add_request(p, SamplingParams(max_tokens=40, temperature=1.0, seed=i))
            for i, p in enumerate(prompts)]
    for _ in range(8):
        engine.step()
    assert 0 < engine.stats.accepted < engine.stats.drafted
    for r in reqs:
        seq = torch.tensor([r.prompt_ids + r.output_ids])
        with torch.no_grad():
            out = model.run(seq, mtp=True)
            # the draft is made at the last position fed to the model, with the pending token,
            # by the strategy's drafter (int8 copies of the MTP module and head with the kernels)
            module = engine.decoder.drafter.module(model)
            h_mtp, _ = model.mtp_hidden(1, out.hidden[:, :-1], seq[:, 1:], module=module)
            expected = engine.decoder.drafter.logits(model, h_mtp[:, -1], module)[0].log_softmax(-1)
        torch.testing.assert_close(engine.decoder.draft_of(r)[1].log(), expected, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(engine.decoder.draft_of(r)[2], h_mtp[0, -1], atol=3e-5, rtol=1e-5)
        row = engine.running.index(r)
        assert engine.cache.lengths[row] == engine.decoder.cache.lengths[row] == seq.shape[1] - 1


@pytest.mark.parametrize("n_drafts", [1, 3])
def test_acceptance_rule_samples_the_target_distribution(n_drafts):
    """Whatever the draft distribution, the first token emitted is distributed as p, and
    the first draft is accepted with probability sum(min(p, q))."""
    g = torch.Generator().manual_seed(0)
    V, N = 6, 200_000
    p = torch.rand(n_drafts + 1, V, generator=g) ** 3
    p /= p.sum(-1, keepdim=True)
    q = torch.rand(n_drafts, V, generator=g) ** 3
    q /= q.sum(-1, keepdim=True)
    drafts = torch.multinomial(q, N, replacement=True, generator=g).T  # (N, D)
    n_acc, nxt = accept(p.expand(N, -1, -1), q.expand(N, -1, -1), drafts, g)
    first = torch.where(n_acc > 0, drafts[:, 0], nxt)
    freq = torch.bincount(first, minlength=V).float() / N
    torch.testing.assert_close(freq, p[0], atol=4e-3, rtol=0)
    accepted = (n_acc > 0).float().mean()
    assert abs(float(accepted) - float(torch.minimum(p[0], q[0]).sum())) < 4e-3
    if n_drafts > 1:  # the second token too, given the first draft was accepted
        kept = n_acc > 0
        second = torch.where(n_acc[kept] > 1, drafts[kept, 1], nxt[kept])
        freq2 = torch.bincount(second, minlength=V).float() / int(kept.sum())
        torch.testing.assert_close(freq2, p[1], atol=6e-3, rtol=0)


def test_greedy_acceptance_is_argmax_match():
    p = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]] * 2)
    q = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    n_acc, nxt = accept(p, q, torch.tensor([[1], [2]]), greedy=True)
    assert n_acc.tolist() == [1, 0] and nxt.tolist() == [0, 1]  # bonus token; corrected token


@pytest.mark.parametrize("depth", [1, 3])
def test_sampled_speculative_reports_acceptance(tiny_args, agreeing_model, depth):
    model = agreeing_model(tiny_args, 0.3)
    engine = Engine(model, decoder=MTPSpeculation(depth))
    reqs = engine.generate(prompts_of([5, 9], tiny_args.vocab_size),
                           SamplingParams(max_tokens=30, temperature=0.7, top_k=20, seed=5))
    assert all(len(r.output_ids) == 30 for r in reqs)
    s = engine.stats
    assert s.drafted > 0 and 0 < s.acceptance <= 1
    # each request's step emits its accepted drafts and one more token, cut at max_tokens;
    # a step drafts `depth` tokens per request, fewer only near the end
    assert s.drafted / depth <= s.decode_tokens <= s.drafted + s.accepted
    assert s.decode_tokens == sum(len(r.output_ids) - 1 for r in reqs)


def test_speculative_depth_fits_the_end_of_the_cache(tiny_args, agreeing_model):
    """Near max_tokens and the end of the cache a step drafts fewer tokens: a prompt that
    fills the context exactly still decodes, and greedily as plain decoding does."""
    model = agreeing_model(tiny_args, 0.3)
    prompt = prompts_of([20], tiny_args.vocab_size)[0]
    params = SamplingParams(max_tokens=12)
    plain = Engine(model, max_len=32).generate([prompt], params)[0]
    spec = Engine(model, max_len=32, decoder=MTPSpeculation(5)).generate([prompt], params)[0]
    assert spec.output_ids == plain.output_ids and len(spec.output_ids) == 12


@pytest.mark.parametrize("depth", [0, -1, 1.5, "2", True])
def test_a_bad_speculative_depth_is_refused(depth):
    from dsmoe.errors import DsmoeError
    with pytest.raises(DsmoeError, match="positive integer or 'auto'"):
        MTPSpeculation(depth)


def test_the_depth_chooser_follows_measured_acceptance():
    """A chain grows while the chance that its last draft is reached and accepted is worth
    a draft, probing an unmeasured position with the rate of the one before."""
    from dsmoe.infer.speculative import DepthChooser
    chooser = DepthChooser(max_depth=4, worth=0.5, prior=4)
    assert chooser.depth() == 4  # nothing measured: optimistic, so the chain is explored
    for _ in range(50):
        chooser.record(4, [4])  # every draft accepted
    assert chooser.depth() == 4
    poor = DepthChooser(max_depth=4, worth=0.5, prior=4)
    for _ in range(50):
        poor.record(2, [0])  # the first draft always rejected: the second never judged
    assert poor.depth() == 1 and poor.reached[2] == 0
    mid = DepthChooser(max_depth=4, worth=0.5, prior=0)
    for a in [2, 1, 1, 0, 2, 1, 1, 1, 0, 2]:  # draft 1: 8/10; draft 2: 3/8
        mid.record(2, [a])
    assert mid.reached[1:3] == [10, 8] and mid.accepted[1:3] == [8, 3]
    assert mid.depth() == 1  # 0.8 x 0.375 = 0.3 < 0.5
    mid.worth = 0.25
    assert mid.depth() == 2  # 0.3 >= 0.25; draft 3 unmeasured: 0.3 x 0.375 < 0.25


def test_auto_depth_decodes_as_plain_greedy(tiny_args, agreeing_model):
    model = agreeing_model(tiny_args, 0.3)
    prompts = prompts_of([6, 11], tiny_args.vocab_size, seed=4)
    params = SamplingParams(max_tokens=30)
    plain = Engine(model, max_batch=2).generate(prompts, params)
    engine = Engine(model, max_batch=2, speculative="auto")
    spec = engine.generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert engine.decoder.chooser.reached[2] > 0  # deeper drafts were tried


def test_drafts_read_int8_copies_of_the_head_and_mtp_module(tiny_args, build, native_kernels):
    """Drafts read int8 copies of the head and of the MTP module, rebuilt when a source
    weight changes; without the native kernels they read the model's own."""
    from dsmoe import kernels
    from dsmoe.infer.speculative import Drafter
    from dsmoe.model.quant import Int8Linear, quantize_rows
    model = build(tiny_args)
    h = torch.randn(2, tiny_args.dim)
    drafter = Drafter()
    with torch.no_grad():
        q, scale = quantize_rows(model.head.weight)
        module = drafter.module(model)
        assert module is not model.mtp[0] and isinstance(module.eh_proj, Int8Linear)
        assert drafter.module(model) is module  # kept while the weights are unchanged
        dequantised = torch.nn.functional.linear(module.norm(h), q.float() * scale.float()[:, None])
        torch.testing.assert_close(drafter.logits(model, h), dequantised, atol=1e-5, rtol=1e-5)
        model.head.weight.mul_(2)
        torch.testing.assert_close(drafter.logits(model, h), 2 * dequantised, atol=2e-5, rtol=1e-5)
        model.mtp[0].norm.weight.mul_(3)
        rebuilt = drafter.module(model)
        assert rebuilt is not module and torch.equal(rebuilt.norm.weight, model.mtp[0].norm.weight)
        with kernels.disabled():
            assert drafter.module(model) is model.mtp[0]
            assert torch.equal(drafter.logits(model, h), model.mtp_logits(1, h))


@pytest.mark.parametrize("depth", [1, 3])
def test_the_native_greedy_step_equals_the_python_step(tiny_args, agreeing_model, native_kernels, monkeypatch, depth):
    """A greedy step in one native call (`native_spec.py`) leaves what the Python step
    leaves: the same tokens, acceptance, next drafts and MTP hidden states, and caches.
    (Two rows: with more than 8 positions per pass the Python step runs the int8 draft
    module on torch's kernels, bf16 activations, which agree to ~1e-3 only.)"""
    from dsmoe.model import native_spec
    model = agreeing_model(tiny_args, 0.3)
    prompts = prompts_of([7, 15], tiny_args.vocab_size, seed=2)
    params = SamplingParams(max_tokens=24)

    def run(native: bool):
        engine = Engine(model, max_batch=3, decoder=MTPSpeculation(depth), prefill_chunk=8)
        calls = []
        real = native_spec.greedy_step
        monkeypatch.setattr(native_spec, "greedy_step",
                            lambda *a: calls.append(1) or real(*a) if native else None)
        reqs = [engine.add_request(p, params) for p in prompts]
        for _ in range(4):
            engine.step()
        state = [engine.decoder.draft_of(r) for r in reqs]
        lengths = engine.cache.lengths.clone()
        latent = [engine.cache.latent[:, i, :n].clone() for i, n in enumerate(lengths.tolist())]
        mtp = [engine.decoder.cache.latent[:, i, :n].clone() for i, n in enumerate(lengths.tolist())]
        while engine.running or engine.waiting:
            engine.step()
        return [r.output_ids for r in reqs], state, latent, mtp, engine.stats, calls

    out, state, latent, mtp, stats, calls = run(True)
    out_py, state_py, latent_py, mtp_py, stats_py, _ = run(False)
    assert calls and out == out_py
    assert (stats.drafted, stats.accepted) == (stats_py.drafted, stats_py.accepted)
    for (d, _, g), (d_py, _, g_py) in zip(state, state_py):
        assert int(d) == int(d_py)
        torch.testing.assert_close(g, g_py, atol=2e-5, rtol=1e-5)
    for a, b in zip(latent + mtp, latent_py + mtp_py):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
