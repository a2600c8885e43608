"""`dsmoe generate`: text from a model directory, streamed to stdout as it is produced.

Works on any directory `dsmoe.interop.hf.load_model_dir` reads: a dsmoe-trained model
saved in Hugging Face format or a DeepSeek-V3/V2 checkpoint from the Hub. Several
`--prompt`s are decoded together as one batch. `--chat` renders the prompt as a user
turn with the checkpoint's chat template (or the tokenizer's documented default).
`--speculative` drafts with the model's MTP module; `--stats` prints decode speed and the
draft acceptance rate to stderr. `--prefix-cache-*` (as `dsmoe serve`): prompt prefixes seen
before come from the prefix cache, in RAM and, with `--prefix-cache-dir`, on disk across runs.
Not here: interactive sessions; use `dsmoe serve` and any OpenAI client for that.
"""
from __future__ import annotations

import sys

from dsmoe.data.tokenizer import end_of_turn_ids
from dsmoe.device import add_device_arguments
from dsmoe.errors import DsmoeError
from dsmoe.infer import prefix_cache, speculative
from dsmoe.infer.engine import Engine
from dsmoe.infer.memory_options import add_memory_arguments
from dsmoe.infer.prefix_cache import PrefixCacheSettings
from dsmoe.infer.requests import tokenize_prompt
from dsmoe.infer.sampling import SamplingParams


def load_engine(model_dir, device=None, dtype=None, prefix: PrefixCacheSettings | None = None,
                quantize=None, max_expert_memory=None, **engine_kwargs):
    """(Engine, tokenizer or None) over the model in `model_dir`; `prefix`: its prefix cache's
    settings; `quantize`, `max_expert_memory`: see memory_options.py."""
    from dsmoe.infer.memory_options import load_options
    from dsmoe.interop.hf import load_model_dir

    options = load_options(quantize, max_expert_memory, device)
    model, tokenizer = load_model_dir(model_dir, dtype=dtype, device=device, **options)
    cache = prefix.build(model, model_dir, tokenizer) if prefix is not None else None
    if cache is not None and prefix.disk_dir is not None and engine_kwargs.get("speculative"):
        print("note: the prefix cache is not used with --speculative", file=sys.stderr)
    return Engine(model, tokenizer, prefix_cache=cache, **engine_kwargs), tokenizer


def chat_ids(tokenizer, text: str) -> list[int]:
    """One user turn, rendered for the assistant's answer (the template brings its own BOS)."""
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}]), add_bos=False)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory")
    parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                        help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no limit")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    speculative.add_arguments(parser)
    add_device_arguments(parser, dtype=True)
    parser.add_argument("--max-len", type=int, default=None, help="context per request")
    parser.add_argument("--stats", action="store_true", help="print speed and acceptance to stderr")
    prefix_cache.add_arguments(parser)
    add_memory_arguments(parser)


def run(args) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos).validate()  # before loading anything
    prefix = prefix_cache.PrefixCacheSettings.from_args(args)
    engine, tokenizer = load_engine(args.model, device=args.device, dtype=args.dtype,
                                    max_batch=len(args.prompt), max_len=args.max_len,
                                    speculative=args.speculative, prefix=prefix, quantize=args.quantize,
                                    max_expert_memory=args.max_expert_memory)
    if tokenizer is None:
        raise DsmoeError(f"{args.model} has no tokenizer.json: save the model with its tokenizer "
                         f"(or use the engine from Python with token ids)")
    if args.chat:
        prompts = [chat_ids(tokenizer, p) for p in args.prompt]
        params.stop_token_ids = end_of_turn_ids(tokenizer)
    else:
        prompts = [tokenize_prompt(tokenizer, p) for p in args.prompt]
    if len(prompts) == 1:  # stream
        for ev in engine.stream(prompts[0], params):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, req in enumerate(engine.generate(prompts, params)):
            print(f"--- [{i}] {args.prompt[i]!r}\n{req.text}")
    if args.stats:
        s = engine.stats
        line = (f"prefill {s.prefill_tokens} tokens at {s.prefill_tokens_per_second:.1f} tok/s; "
                f"decode {s.decode_tokens} tokens at {s.decode_tokens_per_second:.1f} tok/s")
        if engine.speculative:
            line += f"; drafts accepted {s.accepted}/{s.drafted} ({s.acceptance:.0%})"
        if engine.prefix_cache is not None:
            line += f"; prompt tokens from the prefix cache {engine.prefix_cache.stats()['hit_tokens']}"
        print(line, file=sys.stderr)
    if engine.prefix_cache is not None:
        engine.prefix_cache.flush()  # the disk tier's writes, before the process ends
    return 0
