"""The ``geodistill`` command: checks and interactive use around the DVC pipeline.

geodistill check-params [params.yaml]      validate every params section, report all problems
geodistill chat --model DIR --image FILE [--max-new-tokens N] [--out FILE] "question"
                                           answer one question about one image; draw answered boxes
"""

from __future__ import annotations

import argparse
import sys

from geodistill.errors import GeodistillError


def _check_params(args: argparse.Namespace) -> None:
    from geodistill.config import load_all

    load_all(args.params)
    print(f"{args.params}: ok")


def _chat(args: argparse.Namespace) -> None:
    from geodistill.eval.chat import chat

    res = chat(args.model, args.image, args.question, max_new_tokens=args.max_new_tokens, out=args.out)
    if res.max_new_tokens < args.max_new_tokens:
        print(f"note: answer limited to {res.max_new_tokens} tokens by the model's context", file=sys.stderr)
    print(res.answer)
    if res.drawn is not None:
        print(f"boxes: {len(res.boxes)} drawn on {res.drawn}")
    elif res.boxes:
        print(f"boxes: {len(res.boxes)} in the answer; pass --out FILE.png or --out DIR/ to draw them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="geodistill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-params", help="validate params.yaml")
    p.add_argument("params", nargs="?", default="params.yaml")
    p.set_defaults(func=_check_params)
    c = sub.add_parser(
        "chat",
        help="answer one question about one image with a pipeline model or HF LLaVA checkpoint",
        description="Greedy answer to one question; all task tokens work ([grounding], [identify] {box}, "
        "[refer] <p>..</p>); '<image>\\n' is prepended when the question has no <image>. When the "
        "answer holds boxes and --out is given, the image is written there with them drawn.",
    )
    c.add_argument("--model", required=True, help="models/<name> or a local HF-format LLaVA checkpoint")
    c.add_argument("--image", required=True, help="the image file")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    c.add_argument(
        "--out",
        help="where to write the image with the answer's boxes: a .png file, or a folder (existing, or "
        "ending in /) for <image stem>_boxes.png (default: no image is written)",
    )
    c.add_argument("question")
    c.set_defaults(func=_chat)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GeodistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
