"""The ``geodistill`` command: checks and interactive use around the DVC pipeline.

geodistill check-params [params.yaml]      validate every params section, report all problems
geodistill chat --model DIR --image FILE [--max-new-tokens N] [--out FILE] "question"
                                           answer one question about one image; draw answered boxes
geodistill demo [--model NAME=DIR ...] [--test-data DIR] [--host H] [--port N]
                                           local web page: the models side by side on any image
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


DEMO_MODELS = {
    "teacher": "models/teacher",
    "baseline": "models/student_sft",
    "distilled": "models/student_kd",
}
"""The pipeline's models the demo shows by default (those that exist), by their role."""
PREPARED = "data/prepared"


def _demo(args: argparse.Namespace) -> None:
    from geodistill.eval.demo import core
    from geodistill.eval.demo.page import Page, check_limits

    if args.model:
        specs = [core.parse_model_spec(s) for s in args.model]
    else:
        specs = core.default_specs({n: Path(d) for n, d in DEMO_MODELS.items()})
        if not specs:
            raise GeodistillError(
                f"no model to show: none of {', '.join(DEMO_MODELS.values())} exists (run `dvc repro` "
                "first), or pass --model NAME=DIR for each model folder to show"
            )
    limits = {k: getattr(args, k) for k in ("max_pixels", "max_new_tokens") if getattr(args, k) is not None}
    check_limits(**limits)
    core.check_model_folders(specs)  # before the slow loads: every missing folder in one error
    test_data = args.test_data or (PREPARED if (Path(PREPARED) / "test.jsonl").is_file() else None)
    items = core.load_test_items(Path(test_data)) if test_data else []
    page = Page(core.load_models(specs), items, **limits)
    from geodistill.eval.demo.app import serve  # imports Gradio (seconds): only once the models are loaded

    print(f"geodistill demo: {len(page.models)} models, {len(items)} test items, http://{args.host}:{args.port}")
    serve(page, host=args.host, port=args.port)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="local web page: the teacher, baseline and distilled student side by side on any image",
        description="Serve a web page (offline, on 127.0.0.1 by default) where every model answers the same "
        "question about an uploaded or held-out test image, with its boxes drawn, latency and tokens/s, "
        "and IoU / correctness against the ground truth of test items. The models are loaded once.",
    )
    d.add_argument(
        "--model", action="append", metavar="NAME=DIR",
        help="a model to show (repeat for several): a pipeline model folder or a local HF LLaVA checkpoint; "
        "default: " + ", ".join(f"{n}={p}" for n, p in DEMO_MODELS.items()) + " (those that exist)",
    )  # fmt: skip
    d.add_argument(
        "--test-data", help=f"a prepared data folder whose test.jsonl gives the held-out images with ground "
        f"truth (default: {PREPARED} when it exists)",
    )  # fmt: skip
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    d.add_argument("--max-new-tokens", type=int, help="longest answer (default: MAX_NEW_TOKENS in eval/demo)")
    d.add_argument("--max-pixels", type=int, help="largest upload, pixels (default: MAX_PIXELS in eval/demo)")
    d.set_defaults(func=_demo)


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
        "answer holds boxes, the image is written with them drawn.",
    )
    c.add_argument("--model", required=True, help="models/<name> or a local HF-format LLaVA checkpoint")
    c.add_argument("--image", required=True, help="the image file")
    c.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    c.add_argument(
        "--out",
        help="where to write the image with the answer's boxes: a .png file, or a folder for "
        "<image stem>_boxes.png (default: that name in the current folder)",
    )
    c.add_argument("question")
    c.set_defaults(func=_chat)
    _add_demo(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except GeodistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
