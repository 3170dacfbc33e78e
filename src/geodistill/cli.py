"""The ``geodistill`` command: checks and interactive use around the DVC pipeline.

geodistill check-params [params.yaml]      validate every params section, report all problems
geodistill chat --model DIR --image FILE "question"
"""

from __future__ import annotations

import argparse
import sys

from geodistill.errors import GeodistillError


def _check_params(args: argparse.Namespace) -> None:
    from geodistill.config import load_all

    load_all(args.params)
    print(f"{args.params}: ok")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geodistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-params", help="validate params.yaml")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=_check_params)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GeodistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
