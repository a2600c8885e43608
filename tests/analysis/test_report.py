"""The MoE report: routing statistics with known values, cost from flops.py, clear errors."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

from dsmoe import ModelArgs, Transformer
from dsmoe.analysis.flops import count_params, flops_per_token
from dsmoe.analysis.cost import H100_SXM, cost_report, dense_equivalent
from dsmoe.analysis.report import (FIGURES, collect_routing, entropy_bits, mutual_information,
                                   open_validation_shards, write_report)
from dsmoe.data.prepare import prepare
from dsmoe.errors import DataError
from dsmoe.model.moe import RoutingInfo
from dsmoe.train.balance import max_violation


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs.from_preset("tiny")).eval()


def random_batches(seed: int = 1) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {"en": [torch.randint(0, 170, (2, 24), generator=g) for _ in range(2)],
            "code": [torch.randint(170, 340, (3, 24), generator=g)],
            "math": [torch.randint(340, 512, (2, 24), generator=g) for _ in range(3)]}


class DomainRouter:
    """A stand-in model whose one MoE layer sends tokens below 100 to experts 0-2 and the
    rest to experts 4-6: routing that depends on the domain and nothing else."""

    def __init__(self):
        self.args = SimpleNamespace(n_routed_experts=8, n_activated_experts=3, n_layers=2, n_dense_layers=1,
                                    n_moe_layers=1)
        self._p = torch.zeros(1)

    def parameters(self):
        return iter([self._p])

    def moe_layers(self):
        return [SimpleNamespace()]  # block 1's; the statistics need only its place

    def run(self, tokens):
        ids_TK = torch.where(tokens.reshape(-1, 1) < 100, torch.tensor([0, 1, 2]), torch.tensor([4, 5, 6]))
        load_E = torch.bincount(ids_TK.flatten(), minlength=8)
        return SimpleNamespace(routing=[RoutingInfo(ids_TK, torch.ones(ids_TK.shape), None, load_E)])


def test_mutual_information_known_values():
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert mutual_information(torch.tensor([[2, 6], [1, 3]])) == pytest.approx(0.0, abs=1e-12)
    joint = torch.tensor([[7, 1, 0], [2, 2, 4]])
    # I(D; E) = H(D) + H(E) - H(D, E)
    expected = entropy_bits(joint.sum(1)) + entropy_bits(joint.sum(0)) - entropy_bits(joint.flatten())
    assert mutual_information(joint) == pytest.approx(expected)
    assert max_violation(torch.tensor([4, 4, 4, 4])) == 0.0
    assert max_violation(torch.tensor([6, 2, 4, 4])) == pytest.approx(0.5)


def test_domain_bound_routing_scores_one_bit_and_shuffled_near_zero():
    g = torch.Generator().manual_seed(0)
    batches = {"low": [torch.randint(0, 100, (4, 64), generator=g)],
               "high": [torch.randint(100, 200, (4, 64), generator=g)]}
    stats = collect_routing(DomainRouter(), batches, seed=3)
    assert stats.layers == [1] and stats.tokens_D.tolist() == [256, 256]
    assert stats.mi_L[0] == pytest.approx(1.0) and stats.domain_entropy == pytest.approx(1.0)
    assert stats.mi_shuffled_L[0] < 0.01
    # 6 of 8 experts used evenly: max = n, mean = 6n/8, MaxVio = 1/3; within a domain 3 of 8: 5/3.
    assert stats.maxvio_L[0] == pytest.approx(1 / 3)
    assert stats.maxvio_LD[0] == pytest.approx([5 / 3, 5 / 3])
    share = stats.share_LDE()[0]
    torch.testing.assert_close(share[0], torch.tensor([1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.float64) / 3)


def test_statistics_add_up_to_the_forward_passes(tiny):
    batches = random_batches()
    stats = collect_routing(tiny, batches)
    K, E = tiny.args.n_activated_experts, tiny.args.n_routed_experts
    assert stats.domains == ["en", "code", "math"]
    assert stats.tokens_D.tolist() == [96, 72, 144]
    assert stats.counts_LDE.shape == (2, 3, E)
    torch.testing.assert_close(stats.counts_LDE.sum(-1), stats.tokens_D.expand(2, 3) * K)
    # Per-layer load equals the sum of the layers' own load_E over every batch.
    load = torch.zeros(2, E, dtype=torch.long)
    for domain_batches in batches.values():
        for batch in domain_batches:
            load += torch.stack([r.load_E for r in tiny.run(batch).routing])
    torch.testing.assert_close(stats.load_LE, load)
    assert stats.maxvio_L == pytest.approx([max_violation(l) for l in load])
    for mi, mi_shuffled in zip(stats.mi_L, stats.mi_shuffled_L):
        assert 0 <= mi <= stats.domain_entropy and 0 <= mi_shuffled <= stats.domain_entropy


def test_cost_comes_from_flops_and_the_named_accelerator():
    args = ModelArgs.from_preset("small")
    cost = cost_report(args, context=512, utilisation=0.5)
    params = count_params(args)
    assert cost.params["total"] == params.total and cost.params["activated"] == params.activated
    # The dense comparison activates every parameter of a model of the same total size.
    dense = dense_equivalent(args)
    assert count_params(dense).total == params.total == count_params(dense).activated
    assert cost.flops["dense"]["forward"] == flops_per_token(dense, 512).forward
    assert cost.flops["moe"]["forward"] == flops_per_token(args, 512).forward < cost.flops["dense"]["forward"]
    joules = 700.0 / (989.4e12 * 0.5)
    assert H100_SXM.joules_per_flop(0.5) == pytest.approx(joules)
    assert cost.energy_wh_per_million["moe_forward"] == pytest.approx(
        flops_per_token(args, 512).forward * 1e6 * joules / 3600)
    assert cost.kv_cache["mla_values_per_layer"] == args.kv_lora_rank + args.qk_rope_head_dim
    with pytest.raises(DataError, match="utilisation"):
        cost_report(args, context=512, utilisation=1.5)


def test_write_report(tiny, tmp_path):
    stats = collect_routing(tiny, random_batches())
    path = write_report(tmp_path / "report", stats, cost_report(tiny.args, 128), notes=["random weights"])
    text = path.read_text()
    for name in FIGURES.values():
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert (tmp_path / "report" / "report.json").is_file()
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    maxvio_rows, mi_rows = rows[:2], rows[2:]
    for l, row in enumerate(maxvio_rows):
        assert row.split(" | ")[1] == f"{stats.maxvio_L[l]:.3f}"
    for l, row in enumerate(mi_rows):
        assert row.split(" | ")[1:3] == [f"{stats.mi_L[l]:.4f}", f"{stats.mi_shuffled_L[l]:.4f}"]
    assert "NVIDIA H100 SXM" in text and "40%" in text


# --- bad input ----------------------------------------------------------------------------------

def _write_domains(folder, paragraphs: dict[str, int]):
    folder.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    for domain, n in paragraphs.items():
        text = "\n\n".join(" ".join(words[(i + j) % 10] for j in range(40)) + f" {domain} {i}."
                           for i in range(n))
        (folder / f"{domain}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_data")
    # "lonely" has one paragraph: prepare holds out only its tail, shorter than one sequence.
    src = _write_domains(root / "src", {"prose": 40, "lists": 40, "lonely": 1})
    prepare(root / "data", [src], vocab_size=300, val_fraction=0.2, show_progress=False)
    return root / "data"


def test_tokenizer_mismatch_and_empty_domain_are_refused(data_dir, tmp_path):
    from dsmoe.data.shards import TokenShards
    from dsmoe.data.tokenizer import train_tokenizer

    tokenizer = TokenShards(data_dir).tokenizer()
    shards, domains = open_validation_shards(data_dir, tokenizer, ["prose", "lists"], seq_len=16)
    assert domains == ["prose", "lists"] and shards.num_tokens("val", "prose") > 16
    other = train_tokenizer(["something else entirely"] * 3, vocab_size=300)
    with pytest.raises(DataError, match="different tokenizer"):
        open_validation_shards(data_dir, other, None, seq_len=16)
    with pytest.raises(DataError, match=r"'lonely' has \d+ validation tokens"):
        open_validation_shards(data_dir, tokenizer, None, seq_len=32)
    with pytest.raises(DataError, match="no domain 'poetry'"):
        open_validation_shards(data_dir, tokenizer, ["poetry"], seq_len=16)


def test_domain_without_tokens_is_refused(tiny):
    with pytest.raises(DataError, match="'empty' gave no tokens"):
        collect_routing(tiny, {"en": [torch.zeros(1, 4, dtype=torch.long)], "empty": []})


def test_report_command_on_a_saved_tiny_model(tiny, data_dir, tmp_path, capsys):
    from dsmoe.cli import main
    from dsmoe.data.shards import TokenShards
    from dsmoe.data.tokenizer import train_tokenizer
    from dsmoe.interop.hf import save_hf

    save_hf(tiny, tmp_path / "m", tokenizer=TokenShards(data_dir).tokenizer())
    common = ["report", "--data", str(data_dir), "--out", str(tmp_path / "r")]
    argv = common + ["--model", str(tmp_path / "m"), "--domains", "prose", "lists", "--seq-len", "32",
                     "--tokens-per-domain", "100"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["routing"]["domains"] == ["prose", "lists"] and report["routing"]["layers"] == [1, 2]
    assert report["routing"]["tokens"] == {"prose": 128, "lists": 128}  # 100 tokens: 4 whole sequences of 32
    assert report["cost"]["params"]["total"] == count_params(tiny.args).total
    assert "## Cost" in (tmp_path / "r" / "report.md").read_text()
    # a model whose tokenizer is not the data's
    save_hf(tiny, tmp_path / "other", tokenizer=train_tokenizer(["unrelated text"] * 3, vocab_size=300))
    assert main(common + ["--model", str(tmp_path / "other")]) == 1
    assert "different tokenizer" in capsys.readouterr().err
    assert main(common + ["--model", str(tmp_path / "m")]) == 1  # every domain, "lonely" included
    assert re.search(r"'lonely' has \d+ validation tokens", capsys.readouterr().err)
