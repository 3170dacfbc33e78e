"""The ``geodistill`` command: checks and interactive use around the DVC pipeline.

geodistill check-params [params.yaml]      validate every params section, report all problems
geodistill chat --model DIR --image FILE [--max-new-tokens N] [--out FILE] "question"
                                           answer one question about one image; draw answered boxes
geodistill plan [--preset NAME | --params FILE] [--gpus N --zero S --precision P ...]
                                           parameters, FLOPs, memory per GPU, cache size and time of a run
geodistill preset FILE                     a preset's params as `dvc exp run` -S arguments
geodistill demo [--model NAME=DIR ...] [--test-data DIR] [--host H] [--port N]
                                           local web page: the models side by side on any image
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from geodistill.config import FeatureEncoding, Precision
from geodistill.errors import ConfigError, GeodistillError


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


def _plan(args: argparse.Namespace) -> None:
    from geodistill.plan.inputs import FIELDS, read_preset
    from geodistill.plan.report import build_plan, render

    path = Path(args.params) if args.params else Path("presets") / f"{args.preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root, or pass --params FILE")
    flags = {name: getattr(args, name, None) for name in FIELDS}
    if args.lora_targets is not None:
        flags["lora_targets"] = args.lora_targets.split(",")
    print(render(build_plan(read_preset(path, args.base), flags)), end="")


def _preset(args: argparse.Namespace) -> None:
    from geodistill.plan.inputs import override_args, read_preset

    preset = read_preset(args.file)
    if preset.pending:
        print(f"not applied (config.py lacks them): {', '.join(preset.pending)}", file=sys.stderr)
    print("\n".join(override_args(preset)))


_PLAN_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("gpus", int, "GPUs (data-parallel ranks)"),
    ("gpu-memory-gib", float, "memory of one GPU"),
    ("tflops", float, "achieved TFLOP/s per GPU (not the peak)"),
    ("zero", int, "DeepSpeed ZeRO stage 0-3 for distillation"),
    ("micro-batch", int, "records per GPU per distillation forward"),
    ("teacher-batch", int, "records per teacher forward"),
    ("lora-r", int, "LoRA rank on the student's LLM; 0 trains the whole LLM"),
    ("lora-targets", str, "comma-separated linear layer names LoRA wraps"),
    ("lora-dropout", float, "LoRA dropout"),
    ("steps", int, "distillation optimizer steps"),
    ("vocab-size", int, "vocabulary of models built from arch"),
    ("records", int, "training records"),
    ("records-per-image", float, "records per image (prefix reuse)"),
    ("text-tokens", int, "non-image tokens per record"),
    ("prefix-text-tokens", int, "text tokens an image's records share before the image"),
    ("answer-tokens", int, "supervised (cached) tokens per record"),
    ("k", int, "cached top-k"),
    ("encoding", str, "top-k value encoding"),
    ("pooling", int, "feature average pooling"),
)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="will a run fit, and how long will it take (models built on the meta device: no weights)",
        description="Parameters by part, FLOPs per record, memory per GPU for the teacher pass and for "
        "distillation, the teacher cache on disk and the time at an achieved TFLOP/s. Inputs: the params "
        "(a preset's params: section over --base), the preset's plan: section, then these flags.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="geochat", help="presets/NAME.yaml (default geochat)")
    src.add_argument("--params", help="a params file or preset file instead of --preset")
    p.add_argument("--base", default="params.yaml", help="params the file is applied over (if present)")
    for name, kind, text in _PLAN_FLAGS:
        p.add_argument(f"--{name}", type=kind, help=f"{text} (default: from the file)")
    for name in ("precision", "teacher-precision"):
        p.add_argument(f"--{name}", choices=typing.get_args(Precision), help="default: from the file")
    p.add_argument("--attention", choices=("sdpa", "eager"), help="default sdpa")
    p.add_argument(
        "--feature-encoding", choices=typing.get_args(FeatureEncoding), help="cached features"
    )
    for name in ("checkpointing", "freeze-vision", "live-teacher"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=_plan)
    q = sub.add_parser("preset", help="print a preset's params as `dvc exp run` -S arguments")
    q.add_argument("file", help="e.g. presets/geochat.yaml; use: dvc exp run $(geodistill preset FILE)")
    q.set_defaults(func=_preset)


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
    _add_plan_parser(sub)
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
