"""The Gradio page of ``geodistill demo``, served offline.

Offline means: no analytics or version check (``GRADIO_ANALYTICS_ENABLED=False``, set before Gradio is
imported), system fonts instead of the default theme's Google Fonts, no share link, no server-side
rendering (it would start Node), and nothing the page loads from another host (the browser test records
every request the page makes and checks that each goes to the demo's own address).
"""

from __future__ import annotations

import os

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
IMAGE = {"format": "png", "height": 300}
"""Shown images: PNG (Gradio's default WebP would blur the box outlines' colours), 300 px high."""
MAX_FILE_SIZE = "200mb"
"""Uploads above this are refused by Gradio itself (MAX_PIXELS bounds the pixels of the rest)."""


def _theme() -> gr.themes.Base:
    # The default theme @imports its fonts from Google Fonts: use the system's instead.
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def _model_columns(page: Page) -> list[gr.components.Component]:
    """Per model, left to right: its name and folder, the image with its boxes, its answer, its stats."""
    outs: list[gr.components.Component] = []
    with gr.Row(equal_height=False):
        for i, m in enumerate(page.models):
            with gr.Column(min_width=240):
                gr.Markdown(f"### {m.name}", elem_id=f"name-{i}")
                image = gr.Image(label=str(m.folder), interactive=False, elem_id=f"boxes-{i}", **IMAGE)
                outs.append(image)
                outs.append(gr.Textbox(label="answer", lines=3, interactive=False, elem_id=f"answer-{i}"))
                outs.append(gr.HTML(elem_id=f"stats-{i}"))
    return outs


def build_app(page: Page) -> gr.Blocks:
    """The page: image (upload or held-out pick), task and question, then one column per model."""
    with gr.Blocks(title="geodistill demo", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        source = gr.State(None)
        gr.Markdown(f"## {TITLE}")
        with gr.Row():
            with gr.Column():
                upload = gr.File(
                    label=f"Upload an image (at most {page.max_pixels:,} pixels)", type="filepath",
                    elem_id="upload", height=120,
                )  # fmt: skip
                pick = gr.Dropdown(
                    choices=list(page.items), value=None, label="…or pick a held-out test image",
                    elem_id="pick", filterable=True,
                )  # fmt: skip
                preview = gr.Image(label="image", interactive=False, elem_id="preview", **IMAGE)
            with gr.Column():
                task = gr.Radio(list(page.templates), label="task (fills in a question)", elem_id="task")
                question = gr.Textbox(label="question", lines=3, elem_id="question")
                ask = gr.Button("Ask every model", variant="primary", elem_id="ask")
                status = gr.HTML(elem_id="status")
                truth = gr.HTML(elem_id="truth")
                truth_img = gr.Image(label="ground truth", interactive=False, elem_id="truth-img", **IMAGE)
        answers = _model_columns(page)
        upload.upload(page.upload, [upload], [source, preview, pick, status, truth, truth_img])
        upload.clear(lambda: (None, None, ""), None, [source, preview, status])
        pick.input(page.pick, [pick], [source, preview, upload, question, status, truth, truth_img])
        task.input(page.template, [task], [question])
        for trigger in (ask.click, question.submit):
            trigger(page.ask, [source, question], [status, truth, truth_img, *answers])
    return app


def serve(page: Page, *, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Serve the page on http://host:port; ``block=False`` returns at once (tests close the app)."""
    app = build_app(page)
    app.queue(default_concurrency_limit=1)  # one generation at a time: the models are shared
    try:
        app.launch(
            server_name=host, server_port=port, theme=_theme(), css=CSS, ssr_mode=False, share=False,
            footer_links=[], show_error=True, max_file_size=MAX_FILE_SIZE, prevent_thread_lock=not block,
            quiet=True,
        )  # fmt: skip
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise GeodistillError(f"cannot serve on {host}:{port} ({e}); pass another --port or --host") from e
    return app

