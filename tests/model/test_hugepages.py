"""Weights moved into huge-page-advised memory (`dsmoe/model/hugepages.py`): the same
values and outputs, one 2 MB-aligned map holding them, ties kept, training and state_dict
unchanged, a deep copy not mistaken for packed, and the switch."""
import copy
import mmap

import pytest
import torch

from dsmoe.model.hugepages import HUGE_PAGE, SWITCH_ENV, is_packed, pack_weights

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="Linux only (madvise)")


def test_packed_weights_keep_values_and_outputs(tiny_args, build):
    model = build(tiny_args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(tokens)
    assert pack_weights(model) and is_packed(model)
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(tokens), want)
    start, end = model._huge_pages
    assert start % HUGE_PAGE == 0
    assert all(start <= p.data_ptr() < end for p in model.parameters())
    assert pack_weights(model) and model._huge_pages == (start, end)  # once


def test_packed_weights_train_and_copy(tiny_args, build):
    model = build(tiny_args)
    pack_weights(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 7))
    head_before = model.head.weight.detach().clone()
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(model.head.weight, head_before)  # updated in the packed memory
    twin = copy.deepcopy(model)
    assert not is_packed(twin) and is_packed(model)
    for a, b in zip(twin.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_tied_storage_is_left_in_place(tiny_args, build):
    model = build(tiny_args)
    model.head.weight = model.embed.weight  # a tie: both names, one storage
    pack_weights(model)
    assert model.head.weight is model.embed.weight
    assert model.head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_the_switch_leaves_weights_where_they_are(tiny_args, build, monkeypatch):
    monkeypatch.setenv(SWITCH_ENV, "0")
    model = build(tiny_args)
    ptr = model.head.weight.data_ptr()
    assert not pack_weights(model)
    assert model.head.weight.data_ptr() == ptr
