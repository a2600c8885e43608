"""Where one prefill's time goes: per-section thread CPU time, dsmoe against transformers.

The prefill of `bench/decode.py` (one prompt of 448 tokens, random `small` weights, fp32,
our engine's time to first token against transformers' `generate` on the same weights),
on one torch thread, with each side's modules timed in place: every section's own time
(its children's taken out), thread CPU time (steadier than wall time on a shared
machine), the median over rounds of each section, the two engines alternating.
Sections: routed experts, the attention core (dsmoe: `_attend_naive`, i.e. wkv_b, K/V and
the attention kernel, and `_attend_absorbed`, the last block's one query per prompt;
transformers: its SDPA call), the rest of attention (projections,
rope, norms inside it, cache writes), dense FFN and shared experts, gate, RMSNorms, and
the rest (total less the sections: residuals, embedding, head, the engine).

    python bench/prefill_profile.py [--quick]      or      python -m bench prefill_profile
Not here: op-level profiles (torch.profiler gives those), more than one thread.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.decode import PRESET, build_pair, ours_generate, random_prompts, theirs_generate  # noqa: E402, I001
from dsmoe import ModelArgs  # noqa: E402
from dsmoe.infer.engine import Engine  # noqa: E402
import torch  # noqa: E402


class SectionTimer:
    """Self time per section: a section's time less the sections nested in it."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._stack: list[float] = []

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            start = time.thread_time()
            self._stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                nested = self._stack.pop()
                self.totals[name] = self.totals.get(name, 0.0) + spent - nested
                if self._stack:
                    self._stack[-1] += spent
        return timed


def sections():
    """(owner, attribute, section) for both sides; transformers' attention core, the SDPA
    function its attention modules look up by name, is wrapped by `instrumented`."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from dsmoe.model import layers, mla, moe
    return {
        "dsmoe": [(moe.RoutedExperts, "forward", "routed experts"), (mla.MLA, "_attend_naive", "attention core"),
                  (mla.MLA, "_attend_absorbed", "attention core"),
                  (mla.MLA, "forward", "attention rest"), (layers.SwiGLU, "forward", "dense FFN, shared experts"),
                  (moe.Gate, "forward", "gate"), (layers.RMSNorm, "forward", "RMSNorms")],
        "transformers": [(hf.DeepseekV3MoE, "forward", "routed experts"),
                         (hf.DeepseekV3Attention, "forward", "attention rest"),
                         (hf.DeepseekV3MLP, "forward", "dense FFN, shared experts"),
                         (hf.DeepseekV3TopkRouter, "forward", "gate"), (hf.DeepseekV3RMSNorm, "forward", "RMSNorms")],
    }


@contextlib.contextmanager
def instrumented(timer: SectionTimer):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    saved = []
    try:
        for entries in sections().values():
            for owner, attr, name in entries:
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, timer.wrap(getattr(owner, attr), name))
        saved.append((ALL_ATTENTION_FUNCTIONS, "sdpa", ALL_ATTENTION_FUNCTIONS["sdpa"]))
        ALL_ATTENTION_FUNCTIONS["sdpa"] = timer.wrap(ALL_ATTENTION_FUNCTIONS["sdpa"], "attention core")
        yield
    finally:
        for owner, attr, value in reversed(saved):
            if owner is ALL_ATTENTION_FUNCTIONS:
                owner[attr] = value
            else:
                setattr(owner, attr, value)


def run(quick: bool = False) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ModelArgs.from_preset(PRESET).replace(n_mtp_layers=0)
        length = 128 if quick else 448
        with tempfile.TemporaryDirectory() as tmp:
            ours, theirs = build_pair(args, Path(tmp))
        engine = Engine(ours, max_batch=8)
        prompt = random_prompts(args, 1, length, seed=1)
        sides = {"dsmoe": lambda: ours_generate(engine, prompt, 1),
                 "transformers": lambda: theirs_generate(theirs, prompt, 1)}
        runs = {side: [] for side in sides}
        for fn in sides.values():
            fn()  # warm-up
        timer = SectionTimer()
        with instrumented(timer):
            for _ in range(2 if quick else 7):
                for side, fn in sides.items():
                    timer.totals = {}
                    start = time.thread_time()
                    fn()
                    total = time.thread_time() - start
                    runs[side].append({**timer.totals, "total": total})
    finally:
        torch.set_num_threads(threads)
    rows = []
    names = list(dict.fromkeys(name for _, _, name in sections()["dsmoe"])) + ["rest", "total"]
    for side, per_run in runs.items():
        for r in per_run:
            r["rest"] = r["total"] - sum(v for k, v in r.items() if k != "total")
        for name in names:
            ms = 1e3 * statistics.median(r.get(name, 0.0) for r in per_run)
            rows.append({"benchmark": "prefill_profile", "metric": f"{side}: {name}", "value": ms, "unit": "ms",
                         "note": f"one {length}-token prefill, thread CPU time, 1 thread, median of {len(per_run)}"})
    ratio = statistics.median(r["total"] for r in runs["transformers"]) / statistics.median(
        r["total"] for r in runs["dsmoe"])
    rows.append({"benchmark": "prefill_profile", "metric": "prefill_speedup_cpu_time", "value": ratio, "unit": "x",
                 "note": "transformers' total / ours (instrumented runs)"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 128-token prompt, fewer rounds")
    from bench import format_table
    print(format_table(run(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
