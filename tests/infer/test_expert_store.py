"""Experts kept on disk (`--max-expert-memory`): the same logits, bit for bit, as the fully
resident model (fp32 and int8, bf16 and FP8-free checkpoints), an LRU that really evicts,
budgets that are not sizes or too small refused, and greedy decoding through the engine
unchanged."""
import pytest
import torch

from dsmoe import ModelArgs, Transformer, kernels, save_hf
from dsmoe.errors import ConfigError
from dsmoe.infer.generate import load_engine
from dsmoe.infer.memory_options import load_options
from dsmoe.infer.sampling import SamplingParams
from dsmoe.infer.server import health_body
from dsmoe.interop.hf import load_hf


def _args() -> ModelArgs:
    return ModelArgs.from_preset("tiny").replace(n_routed_experts=16, n_activated_experts=2, moe_inter_dim=48)


def _expert_bytes(args, itemsize=4) -> int:
    return 3 * args.moe_inter_dim * args.dim * itemsize


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("offload")
    torch.manual_seed(0)
    save_hf(Transformer(_args()), path, dtype="bf16")  # converted on load: the store must match
    return path


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_offloaded_experts_give_the_resident_models_logits_bit_for_bit(checkpoint, quantize):
    args = _args()
    tokens = torch.randint(0, args.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    # `auto` on both: 192 tokens take the ragged path (the store: its per-expert twin), 24 and
    # 2 tokens the native kernel (the store: the same kernel over its experts' pointers, when
    # the budget holds the experts the call chose).
    resident = load_hf(checkpoint, dtype="fp32", quantize=quantize)
    itemsize = 1 if quantize else 4
    budget = 5 * _expert_bytes(args, itemsize)  # 5 of 16 experts x 3 MoE layers (MTP included)
    options = load_options(quantize, budget)
    offloaded = load_hf(checkpoint, dtype="fp32", **options)
    store = options["prepare"].store
    assert not any(".experts." in k for k in offloaded.state_dict())  # never loaded
    if not kernels.available():  # torch's few-token twin of the store's loop is the ragged path
        resident.set_expert_impl("ragged")
    for n in (96, 1):
        assert torch.equal(_logits(offloaded, tokens[:, :n]), _logits(resident, tokens[:, :n]))
    # 24 tokens choose more experts than the budget holds: the store runs them one at a time
    # (the budget holds) where the resident model runs the native kernel: float rounding apart
    # (int8: torch's int8 kernel takes bf16 activations, the native one fp32)
    tol = 2e-3 if quantize else 1e-5
    torch.testing.assert_close(_logits(offloaded, tokens[:, :12]), _logits(resident, tokens[:, :12]),
                               atol=tol, rtol=tol)
    assert store.stats.misses > 0 and store.stats.bytes_held <= budget
    assert store.stats.bytes_read > budget  # it evicted and read experts again
    # a budget that holds every expert: the store takes the native kernel too, bit for bit
    roomy = load_options(quantize, 48 * _expert_bytes(args, itemsize))
    assert torch.equal(_logits(load_hf(checkpoint, dtype="fp32", **roomy), tokens[:, :12]),
                       _logits(resident, tokens[:, :12]))


def test_greedy_decoding_is_unchanged(checkpoint):
    prompts = [[5, 9, 2, 7], [3, 3, 1]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    outputs, health = [], []
    for budget in (None, 12 * _expert_bytes(_args())):  # a quarter of the 48: hits and misses
        engine, _ = load_engine(checkpoint, device="cpu", dtype="fp32", max_expert_memory=budget, max_batch=2)
        outputs.append([r.output_ids for r in engine.generate(prompts, params)])
        health.append(health_body(engine, "m")["expert_store"])
    assert outputs[0] == outputs[1]
    assert health[0] is None
    assert health[1]["misses"] > 0 and 0 < health[1]["hit_rate"] < 1
    assert health[1]["bytes_held"] <= health[1]["budget_bytes"]


def test_speculation_over_offloaded_experts_drafts_with_the_module_itself(checkpoint):
    """With experts paged from disk, drafts run the MTP module itself (an int8 copy would
    duplicate the store), and greedy speculative output stays plain greedy's."""
    prompts = [[5, 9, 2, 7], [3, 3, 1]]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    budget = 12 * _expert_bytes(_args())
    plain, _ = load_engine(checkpoint, device="cpu", dtype="fp32", max_expert_memory=budget, max_batch=2)
    spec, _ = load_engine(checkpoint, device="cpu", dtype="fp32", max_expert_memory=budget, max_batch=2,
                          speculative=2)
    assert [r.output_ids for r in spec.generate(prompts, params)] == \
        [r.output_ids for r in plain.generate(prompts, params)]
    assert spec.decoder.drafter.module(spec.model) is spec.model.mtp[0] and spec.stats.drafted > 0


@pytest.mark.parametrize("budget, message", [("lots", "give a size"), ("1KB", "give at least"),
                                             ("0", "give a size")])
def test_bad_budgets_are_refused_before_loading(checkpoint, budget, message):
    with pytest.raises(ConfigError, match=message):
        load_hf(checkpoint, dtype="fp32", **load_options(None, budget))
