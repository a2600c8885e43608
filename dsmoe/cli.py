"""The `dsmoe` command line: a verb table over typed functions.

Each verb lives in the module that owns its concept; that module exposes
`add_arguments(parser)` and `run(args) -> int | None`. Modules are imported only
when their verb is called, so `dsmoe params` never pays for FastAPI or matplotlib.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dsmoe.errors import DsmoeError

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "params": ("dsmoe.analysis.flops", "parameter, FLOP and KV-cache accounting for a config"),
    "prepare": ("dsmoe.data.prepare", "build the tokenizer and packed token shards"),
    "train": ("dsmoe.train.pretrain", "pretrain a model (aux-loss-free balancing, MTP)"),
    "generate": ("dsmoe.infer.generate", "generate text from a model directory"),
    "serve": ("dsmoe.infer.server", "OpenAI-compatible HTTP server"),
    "convert": ("dsmoe.interop.convert", "convert a Hugging Face checkpoint (FP8 -> bf16/fp32, ...)"),
    "route": ("dsmoe.analysis.routing", "show which experts each token is routed to"),
    "report": ("dsmoe.analysis.report", "routing, balance and cost report with figures"),
    "explore": ("dsmoe.analysis.explore", "a web page to explore routing, balance and training"),
    "sft": ("dsmoe.train.sft", "supervised fine-tuning on chat data"),
    "grpo": ("dsmoe.train.grpo", "reinforcement learning with verifiable rewards (GRPO)"),
    "esft": ("dsmoe.train.esft", "expert-specialised fine-tuning"),
    "expand": ("dsmoe.train.expand", "add routed experts and train them on a new domain"),
    "demo": ("dsmoe.demo", "the end-to-end demo run by `make demo`"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsmoe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"dsmoe: unknown verb {argv[0]!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    verb, rest = argv[0], argv[1:]
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dsmoe {verb}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = module.run(args)
    except DsmoeError as err:
        print(f"dsmoe {verb}: error: {err}", file=sys.stderr)
        return 1
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
