"""Tiny DeepSeek models made by transformers (the second implementation), offline, random.

Each config stands for a real family: V3 (sigmoid, groups, query compression, bias), V2-Lite
(softmax, greedy, no query compression, unnormalised top-k), V2 (group-limited greedy,
routed scale 16, YaRN as V2-Lite's mscale 0.707), V3 with YaRN past its original context,
and V3 stored in the rotate-half RoPE layout (rope_interleave=false).
"""
import pytest
import torch

HF_COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
    num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, initializer_range=0.05,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32,
            beta_fast=32, beta_slow=1)
HF_CONFIGS = {
    "v3": ("deepseek_v3", dict(q_lora_rank=32, n_group=4, topk_group=2, n_shared_experts=1,
                               routed_scaling_factor=2.5, norm_topk_prob=True)),
    "v2-lite": ("deepseek_v2", dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                                    norm_topk_prob=False, routed_scaling_factor=1.0)),
    "v2-grouped-yarn": ("deepseek_v2", dict(q_lora_rank=32, n_shared_experts=2, n_group=4, topk_group=2,
                                            topk_method="group_limited_greedy", norm_topk_prob=False,
                                            routed_scaling_factor=16.0,
                                            rope_parameters={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707})),
    "v3-yarn": ("deepseek_v3", dict(q_lora_rank=32, n_group=4, topk_group=2, n_shared_experts=1,
                                    routed_scaling_factor=2.5,
                                    rope_parameters={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8})),
    "v3-rotate-half": ("deepseek_v3", dict(q_lora_rank=None, n_group=2, topk_group=1, n_shared_experts=1,
                                           routed_scaling_factor=1.5, rope_interleave=False)),
}
# Prompts run past the YaRN configs' original context of 32 positions.
PROMPT_LEN = 40


def pytest_generate_tests(metafunc):
    """A test taking `hf_name` runs once per config."""
    if "hf_name" in metafunc.fixturenames:
        metafunc.parametrize("hf_name", sorted(HF_CONFIGS))


def make_hf_model(name: str, seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    model_type, extra = HF_CONFIGS[name]
    config_cls = transformers.DeepseekV3Config if model_type == "deepseek_v3" else transformers.DeepseekV2Config
    model_cls = (transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3"
                 else transformers.DeepseekV2ForCausalLM)
    config = config_cls(**HF_COMMON, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # a trained-looking balancing bias, negative entries included
            bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (directory written by transformers' save_pretrained, the transformers model)."""
    made = {}

    def get(name: str):
        if name not in made:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(f"hf-{name}")
            model.save_pretrained(path, max_shard_size="200KB")  # several shards and an index
            made[name] = (path, model)
        return made[name]
    return get


@pytest.fixture
def prompt():
    torch.manual_seed(1)
    return torch.randint(0, HF_COMMON["vocab_size"], (2, PROMPT_LEN))
