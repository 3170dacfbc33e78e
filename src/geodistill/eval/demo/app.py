"""The Gradio page of ``geodistill demo``, served offline.

Offline means: no analytics or version check (``GRADIO_ANALYTICS_ENABLED=False``, set before Gradio is
imported), no share link, no server-side rendering (it would start Node), and nothing the page loads from
another host. Gradio's default theme uses fonts bundled with Gradio (``LocalFont``), served by the demo
itself; other themes (Soft, Glass, ...) name Google Fonts and must not be used here. The browser test
records every request the page makes and checks that each goes to the demo's own address.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read when gradio is imported and at launch

import gradio as gr

from geodistill.errors import GeodistillError
from geodistill.eval.demo.page import Page

TITLE = "geodistill: teacher, baseline and distilled student side by side"
CSS = """
.demo-error { color: #b00020; font-weight: 600; }
.demo-ok { color: #1b7f1b; font-weight: 600; }
.demo-wrong { color: #b00020; font-weight: 600; }
.demo-stats, .demo-done { color: #555; font-size: 0.9em; }
"""
IMAGE = {"format": "png", "height": 260}
"""Shown images: PNG (Gradio's default WebP would blur the box outlines' colours), 260 px high."""
MAX_FILE_SIZE = "200mb"
"""Uploads above this are refused by Gradio itself (MAX_PIXELS bounds the pixels of the rest)."""


def _answer_columns(page: Page) -> tuple[list[gr.components.Component], list[gr.components.Component]]:
    """The ground truth (hidden when there is none), then per model: its name, the image with its boxes
    (labelled with its folder), its answer and its stats. Returns ([column, text, image] of the ground
    truth, [image, answer, stats] of each model in turn)."""
    answers: list[gr.components.Component] = []
    with gr.Row(equal_height=False):
        with gr.Column(min_width=220, visible=False) as truth_col:
            gr.Markdown("### ground truth")
            truth_img = gr.Image(label="test item", interactive=False, elem_id="truth-img", **IMAGE)
            truth = gr.HTML(elem_id="truth")
        for i, m in enumerate(page.models):
            with gr.Column(min_width=220):
                gr.Markdown(f"### {m.name}", elem_id=f"name-{i}")
                answers += [
                    gr.Image(label=str(m.folder), interactive=False, elem_id=f"boxes-{i}", **IMAGE),
                    gr.Textbox(label="answer", lines=3, interactive=False, elem_id=f"answer-{i}"),
                    gr.HTML(elem_id=f"stats-{i}"),
                ]
    return [truth_col, truth, truth_img], answers


def _with_truth_column(action: Callable[..., tuple], at: int) -> Callable[..., list]:
    """``action``'s outputs with the ground-truth column's visibility inserted before the ground truth
    (output ``at``: None when there is none)."""

    @functools.wraps(action)  # Gradio reads the wrapped signature to match the inputs
    def shown(*args: Any) -> list:
        out = list(action(*args))
        return [*out[:at], gr.Column(visible=out[at] is not None), out[at] or "", *out[at + 1 :]]

    return shown


def build_app(page: Page) -> gr.Blocks:
    """The page: image (upload or held-out pick), task and question; then the ground truth and one column
    per model."""
    with gr.Blocks(title="geodistill demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        source = gr.State(None)
        gr.Markdown(f"## {TITLE}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(
                    label=f"Upload an image (at most {page.max_pixels:,} pixels)", type="filepath",
                    elem_id="upload", height=110,
                )  # fmt: skip
                pick = gr.Dropdown(
                    choices=list(page.items), value=None, label="…or pick a held-out test image",
                    elem_id="pick", filterable=True,
                )  # fmt: skip
            preview = gr.Image(label="image", interactive=False, elem_id="preview", **IMAGE)
            with gr.Column():
                task = gr.Radio(list(page.templates), label="task (fills in a question)", elem_id="task")
                question = gr.Textbox(label="question", lines=2, elem_id="question")
                ask = gr.Button("Ask every model", variant="primary", elem_id="ask")
                status = gr.HTML(elem_id="status")
        shown, answers = _answer_columns(page)
        upload.upload(_with_truth_column(page.upload, 4), [upload], [source, preview, pick, status, *shown])
        upload.clear(lambda: (None, None, ""), None, [source, preview, status])
        pick.input(
            _with_truth_column(page.pick, 5), [pick], [source, preview, upload, question, status, *shown]
        )
        task.input(page.template, [task], [question])
        for trigger in (ask.click, question.submit):
            trigger(_with_truth_column(page.ask, 1), [source, question], [status, *shown, *answers])
    return app


def serve(page: Page, *, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Serve the page on http://host:port; ``block=False`` returns at once (tests close the app)."""
    app = build_app(page)
    app.queue(default_concurrency_limit=1)  # one generation at a time: the models are shared
    try:
        app.launch(
            server_name=host, server_port=port, css=CSS, ssr_mode=False, share=False,
            footer_links=[], show_error=True, max_file_size=MAX_FILE_SIZE, prevent_thread_lock=not block,
            quiet=True,
        )  # fmt: skip
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise GeodistillError(f"cannot serve on {host}:{port} ({e}); pass another --port or --host") from e
    return app

