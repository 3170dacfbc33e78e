"""Figures: PNGs that decode, and no figure (not an empty one) when there is nothing to draw."""

from __future__ import annotations

from PIL import Image

from geodistill.eval.figures import _loss_panels, losses_figure, pick_examples, plot_confusion_matrix
from geodistill.eval.metrics import classification_metrics


def test_plot_confusion_matrix_writes_png(tmp_path):
    m = classification_metrics(["a", "b", ""], ["a", "b", "b"], ["a", "b"])
    out = plot_confusion_matrix(m["confusion"], m["rows"], tmp_path / "fig" / "cm.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.load()


def test_losses_figure(tmp_path):
    assert losses_figure({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    curves = {
        "teacher": {"loss": ([1, 2], [2.0, 1.0])},
        "student_kd": {"loss": ([1], [3.0]), "kl": ([1], [0.1])},
    }
    out = losses_figure(curves, tmp_path / "losses.png")
    with Image.open(out) as im:
        assert im.width > im.height  # two panels side by side: loss, student_kd's kl


def test_loss_panels_include_the_on_policy_terms_when_logged():
    kd = {t: ([4, 8], [0.5, 0.4]) for t in ("loss", "kl", "onpolicy_single", "onpolicy_long", "align")}
    titles = [title for title, _ in _loss_panels({"student_kd": kd})]
    assert titles[1:] == [f"student_kd: {t}" for t in ("kl", "onpolicy_single", "onpolicy_long", "align")]


def test_pick_examples_prefers_one_of_each_kind():
    rows = [{"id": i, "meta": {"size": s, "multi": False}} for i, s in enumerate(["small", "small", "large"])]
    assert [r["id"] for r in pick_examples(rows, 2)] == [0, 2]
    assert [r["id"] for r in pick_examples(rows, 5)] == [0, 1, 2]
