"""The `dsmoe` command line: a verb table over typed functions.

Each verb lives in the module that owns its concept; that module exposes
`add_arguments(parser)` and `run(args) -> int | None`. Modules are imported only
when their verb is called, so `dsmoe params` never pays for FastAPI or matplotlib.

No bad input ends in a traceback: `main` turns the project's errors (DsmoeError and its
subclasses), operating-system errors (a missing or unwritable path, a full disk) and a
missing optional package into one line on stderr. Exit codes: 0 success, 1 the input was
refused while running (that one line says why and how to fix it), 2 the command line
itself is malformed (argparse's usage message), 130 interrupted. Set DSMOE_TRACEBACK=1
to see the traceback behind a one-line error.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
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
    try:
        return _run_verb(verb, rest)
    except (DsmoeError, OSError, ModuleNotFoundError) as err:
        if os.environ.get("DSMOE_TRACEBACK"):
            raise
        message = str(err) if isinstance(err, DsmoeError) else _describe(err)
        print(f"dsmoe {verb}: error: {' '.join(message.split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dsmoe {verb}: interrupted", file=sys.stderr)
        return 130


def _run_verb(verb: str, rest: list[str]) -> int:
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"dsmoe {verb}", description=help_text)
    module.add_arguments(parser)
    try:
        args = parser.parse_args(rest)
    except SystemExit as exit:  # a malformed command line (2, usage printed) or --help (0)
        return int(exit.code or 0)
    return int(module.run(args) or 0)


# what to do about an operating-system error, by errno
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "give a file there, not a folder",
    errno.EEXIST: "choose another path, or remove what is there",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "choose a writable location",
    errno.ENOSPC: "free disk space, or choose an output on another disk",
}


def _describe(err: OSError | ModuleNotFoundError) -> str:
    """One line for an error that is not the project's own: what, where, and the fix."""
    if isinstance(err, ModuleNotFoundError):
        return (f"this command needs the Python package {err.name!r}, which is not installed; "
                f"install it (see the optional dependencies in the README)")
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    what = err.strerror or str(err) or type(err).__name__
    where = f": {' -> '.join(paths)}" if paths else ""
    return f"{what}{where}; {_OS_FIXES.get(err.errno, 'check the path and try again')}"


if __name__ == "__main__":
    raise SystemExit(main())
