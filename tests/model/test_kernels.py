"""The native few-row kernels (`dsmoe/kernels`) against torch: every row count up to and
beyond a block of 8, shapes that are not multiples of the vector width, strided rows,
int8 weights with bf16 scales, the routed experts of a few tokens, and the fallback."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from dsmoe import kernels
from dsmoe.kernels import build as kernel_build


pytestmark = pytest.mark.usefixtures("native_kernels")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 17])
@pytest.mark.parametrize("out_in", [(37, 19), (64, 384), (1000, 130)])
def test_linear_equals_torch(rows, out_in):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, out_in[1], generator=g), torch.randn(*out_in, generator=g)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


def test_linear_reads_strided_rows_and_keeps_leading_dims():
    x = torch.randn(2, 3, 100)[..., :64]  # rows with a stride of 100
    w = torch.randn(48, 64)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 8, 11])
def test_int8_linear_is_the_dequantised_product(rows):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (300, 200), generator=g, dtype=torch.int8)
    scale = (torch.rand(300, generator=g) / 100).to(torch.bfloat16)
    x = torch.randn(rows, 200, generator=g)
    want = F.linear(x.double(), q.double()) * scale.double()
    torch.testing.assert_close(kernels.linear(x, q, scale).double(), want, atol=1e-4, rtol=1e-5)


def reference_experts(x, ids, weights, w1, w3, w2):
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, a in zip(ids[t].tolist(), weights[t].tolist()):
            y[t] += a * F.linear(F.silu(F.linear(x[t], w1[e])) * F.linear(x[t], w3[e]), w2[e])
    return y


@pytest.mark.parametrize("tokens", [1, 2, 8, 13])
def test_experts_equal_a_loop_over_tokens(tokens):
    g = torch.Generator().manual_seed(tokens)
    E, F_, D, K = 12, 40, 36, 3
    w1, w3, w2 = torch.randn(E, F_, D, generator=g), torch.randn(E, F_, D, generator=g), torch.randn(E, D, F_, generator=g)
    x = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=g)
    torch.testing.assert_close(kernels.experts(x, ids, weights, w1, w3, w2),
                               reference_experts(x, ids, weights, w1, w3, w2), atol=1e-3, rtol=1e-5)


def test_int8_experts_use_their_scales():
    g = torch.Generator().manual_seed(0)
    E, F_, D = 6, 24, 32
    qs = [torch.randint(-127, 128, shape, generator=g, dtype=torch.int8) for shape in ((E, F_, D), (E, F_, D), (E, D, F_))]
    scales = [(torch.rand(q.shape[:2], generator=g) / 100).to(torch.bfloat16) for q in qs]
    x, ids, weights = torch.randn(3, D, generator=g), torch.tensor([[0, 5], [5, 2], [1, 0]]), torch.rand(3, 2, generator=g)
    dense = [q.float() * s.float().unsqueeze(-1) for q, s in zip(qs, scales)]
    torch.testing.assert_close(kernels.experts(x, ids, weights, *qs, tuple(scales)),
                               reference_experts(x, ids, weights, *dense), atol=1e-4, rtol=1e-4)


def test_experts_reject_an_id_out_of_range():
    w = torch.randn(4, 8, 16)
    with pytest.raises(RuntimeError, match="outside"):
        kernels.experts(torch.randn(1, 16), torch.tensor([[4]]), torch.ones(1, 1), w, w, w.transpose(1, 2).contiguous())


def test_supports_only_what_the_kernels_take():
    w = torch.randn(8, 16)
    assert kernels.supports(torch.randn(1, 16), w)
    assert not kernels.supports(torch.randn(1, 16, dtype=torch.float64), w)
    assert not kernels.supports(torch.randn(1, 16), w.t())  # not contiguous
    with kernels.disabled():
        assert not kernels.available() and not kernels.supports(torch.randn(1, 16), w)


def test_without_a_compiler_one_warning_and_torch(monkeypatch, tmp_path):
    """No compiler on the path: a warning that says what to install, then the torch paths."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path / "cache"))
    importlib.reload(kernel_build)
    try:
        with pytest.warns(UserWarning, match="no C compiler"):
            assert not kernels.available()
        assert not kernels.supports(torch.randn(1, 4), torch.randn(2, 4))
    finally:
        monkeypatch.undo()
        importlib.reload(kernel_build)


def test_builds_once_into_its_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    importlib.reload(kernel_build)
    try:
        assert kernels.available()
        built = list(tmp_path.glob("dsmoe-kernels-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        importlib.reload(kernel_build)
        assert kernels.available() and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    finally:
        monkeypatch.undo()
        importlib.reload(kernel_build)
