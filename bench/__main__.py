"""`python -m bench [NAME ...] [--quick]`: run the benchmarks and print one table."""
from __future__ import annotations

import argparse
import sys

from bench import available, format_table, run_benchmarks


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {names})")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: smaller sizes, fewer repetitions")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names]
    if unknown:
        print(f"python -m bench: unknown benchmark(s) {unknown}; choose from {names}", file=sys.stderr)
        return 2
    rows, failed = run_benchmarks(args.names or names, quick=args.quick)
    print(format_table(rows))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
