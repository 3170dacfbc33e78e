"""The teacher-edge table: task means and every set, judged against the report's noise band."""

from geodistill.bench.edge import edge_rows
from geodistill.eval.tasks import combine


def _metrics(aid: float, ucm: float) -> dict:
    sets = {"aid": {"OA": aid, "AA": aid, "n": 400}, "ucm": {"OA": ucm, "AA": ucm, "n": 400}}
    return {"scene": combine("scene", sets)}


def test_edge_rows_cover_task_means_and_sets():
    rows = edge_rows(_metrics(0.9, 0.6), _metrics(0.5, 0.6))
    oa = {r[1]: r for r in rows if r[0] == "scene OA"}
    assert list(oa) == ["mean", "aid", "ucm"]
    assert oa["aid"][2:4] == ["90.0", "50.0"] and oa["aid"][6] == "teacher ahead"
    assert oa["ucm"][4].startswith("+0.0 ± ") and oa["ucm"][6] == "within noise"
    assert oa["mean"][5] == "800" and oa["mean"][6] == "teacher ahead"
    assert not [r for r in rows if r[0].startswith("VQA")]  # no VQA metrics: no rows, no error
