"""The whole model: shapes, MTP, and input checks raised before any computation."""
import pytest
import torch

from dsmoe.errors import DsmoeError
from dsmoe.infer.cache import LatentCache


def test_logits_mtp_and_routing_shapes(tiny_args, build):
    model = build(tiny_args.replace(n_mtp_layers=2))
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 10))
    out = model.run(tokens, mtp=True)
    assert out.logits.shape == (2, 10, tiny_args.vocab_size)
    assert [tuple(l.shape) for l in out.mtp_logits] == [(2, 9, 512), (2, 8, 512)]
    assert len(out.routing) == tiny_args.n_layers - tiny_args.n_dense_layers
    assert len(out.mtp_routing) == 2
    assert out.routing[0].ids_TK.shape == (20, tiny_args.n_activated_experts)
    assert len(model.moe_layers()) == len(out.routing) + 2
    torch.testing.assert_close(model(tokens), out.logits)


def test_mtp_depth_one_uses_next_token_embedding_first(tiny_args, build):
    model = build(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (1, 6))
    out = model.run(tokens, mtp=True)
    mtp = model.mtp[0]
    x = mtp.eh_proj(torch.cat([mtp.enorm(model.embed(tokens[:, 1:])), mtp.hnorm(out.hidden[:, :5])], -1))
    h, _ = mtp.block(x, model.rope_cos[None, :5], model.rope_sin[None, :5])
    torch.testing.assert_close(out.mtp_logits[0], model.head(mtp.norm(h)))


def test_mtp_is_causal(tiny_args, build):
    model = build(tiny_args)
    a = torch.randint(0, tiny_args.vocab_size, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % tiny_args.vocab_size
    la, lb = model.run(a, mtp=True), model.run(b, mtp=True)
    # MTP position i sees tokens up to i+1: positions < 7 are unchanged.
    torch.testing.assert_close(la.mtp_logits[0][:, :7], lb.mtp_logits[0][:, :7])
    torch.testing.assert_close(la.logits[:, :8], lb.logits[:, :8])


def test_bad_inputs_raise_before_computing(tiny_args, build):
    model = build(tiny_args)
    with pytest.raises(DsmoeError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(DsmoeError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(DsmoeError, match="exceeds max_seq_len=128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(DsmoeError, match="integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(DsmoeError, match="attn_impl='flash'"):
        model(torch.zeros(1, 4, dtype=torch.long), attn_impl="flash")
    cache = LatentCache(tiny_args, batch_size=1, max_len=256)
    model(torch.zeros(1, 100, dtype=torch.long), cache)
    with pytest.raises(DsmoeError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 29, dtype=torch.long), cache)


def test_backward_reaches_every_trained_parameter(tiny_args, build):
    model = build(tiny_args).train()
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 16))
    out = model.run(tokens, mtp=True)
    loss = out.logits.logsumexp(-1).mean() + out.mtp_logits[0].logsumexp(-1).mean()
    loss = loss + sum(r.scores_TE.mean() for r in out.routing + out.mtp_routing)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(b.grad is None for b in model.buffers())  # the balancing bias is not trained by gradients


@pytest.mark.parametrize("cached", [0, 5])
def test_outputs_at_one_position_per_row_equal_the_full_stack_there(tiny_args, build, cached):
    """`hidden(..., outputs_at_B=...)` (a prefill's last block, computed for one query per
    row, attending in latent space) gives the full stack's hidden states at those positions,
    and fills the cache as the full stack does: causal rows, and rows of different lengths
    (a mask) after a cached start."""
    model = build(tiny_args)
    tokens = torch.randint(0, tiny_args.vocab_size, (3, 9))
    start = torch.randint(0, tiny_args.vocab_size, (3, cached))
    at = torch.tensor([8, 3, 6])
    caches = []
    with torch.no_grad():
        for outputs_at in (None, at):
            cache = LatentCache(tiny_args, 3, 32)
            if cached:  # rows of different lengths before the new tokens
                model.hidden(start, cache, attn_impl="naive")
                cache.rewind([0, 2, 4])
            h, _ = model.hidden(tokens, cache, attn_impl="naive", outputs_at_B=outputs_at)
            caches.append((h, cache))
    (full, cache_full), (picked, cache_picked) = caches
    assert picked.shape == (3, 1, tiny_args.dim)
    torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at], atol=2e-5, rtol=1e-4)
    assert torch.equal(cache_full.lengths, cache_picked.lengths)
    torch.testing.assert_close(cache_full.latent, cache_picked.latent, atol=0, rtol=0)
