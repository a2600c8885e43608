"""`--max-expert-memory`: a checkpoint whose routed experts are 6x the budget runs in a fresh
process with peak resident memory at most the budget + the non-expert weights + MARGIN over
the memory before loading, while every expert is used (a long prompt, then decoding)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from dsmoe import ModelArgs, Transformer, save_hf

# Besides the weights: Python objects, allocator arenas, the meta model, activations of a
# 64-token prompt, the expert being read; measured 21 MiB (loading the 96 MiB of experts
# would need 96 MiB more than the budget).
MARGIN = 40 << 20
BUDGET = 16 << 20
CHILD = r"""
import json, sys
import torch

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

torch.set_num_threads(1)
from dsmoe.infer.memory_options import load_options
from dsmoe.interop.hf import load_hf
from dsmoe.model.quant import weight_bytes
import safetensors.torch, tqdm  # imported before measuring: they are not the checkpoint
from dsmoe import ModelArgs, Transformer
with torch.no_grad():  # the kernels' first-use buffers are not the model's either
    Transformer(ModelArgs.from_preset("tiny"))(torch.zeros(1, 64, dtype=torch.long))
before = status("VmRSS:")
options = load_options(None, int(sys.argv[2]))
model = load_hf(sys.argv[1], dtype="fp32", **options)
with torch.no_grad():
    tokens = torch.randint(0, model.args.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    for n in (64, 63, 62, 61):  # a prompt, then single tokens
        model(tokens[:, :n] if n == 64 else tokens[:, n:n + 1])
s = options["prepare"].store.stats
print(json.dumps({"before": before, "peak": status("VmHWM:"), "non_expert": weight_bytes(model),
                  "misses": s.misses, "held": s.bytes_held, "read": s.bytes_read}))
"""


def _args() -> ModelArgs:
    """32 routed experts of 1.5 MiB (fp32) in each of 2 MoE layers: 96 MiB of experts."""
    return ModelArgs(vocab_size=2000, dim=512, n_layers=3, n_dense_layers=1, inter_dim=1024, n_heads=4,
                     max_seq_len=256, moe_inter_dim=256, n_routed_experts=32, n_shared_experts=1,
                     n_activated_experts=4, n_expert_groups=1, n_limited_groups=1, q_lora_rank=128,
                     kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                     n_mtp_layers=0)


def test_peak_memory_stays_within_the_budget_plus_the_rest(tmp_path):
    torch.manual_seed(0)
    with torch.no_grad():
        save_hf(Transformer(_args()), tmp_path, dtype="fp32")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(BUDGET)], capture_output=True,
                         text=True, check=True, env=env).stdout
    r = json.loads(out.strip().splitlines()[-1])
    experts = 2 * 32 * 3 * 256 * 512 * 4
    assert experts >= 6 * BUDGET
    assert r["read"] >= experts  # every expert was used, some more than once
    assert r["held"] <= BUDGET
    assert r["peak"] - r["before"] <= BUDGET + r["non_expert"] + MARGIN, r
