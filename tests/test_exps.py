"""geodistill.exps: tables and verdicts on known numbers, the queue logic against a recorded `dvc`, and
(slow) the three commands end to end with real `dvc exp run --queue` / `dvc queue start` on a tiny
project whose "pipeline" writes metrics computed from its params."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from geodistill import exps
from geodistill.eval.tasks import HEADLINE, PRIMARY


def _headline(**values: float) -> dict[str, float]:
    return {h.key: values.get(h.task, 0.5) for h in HEADLINE}


def test_primary_is_one_metric_per_task_in_table_order():
    assert [h.key for h in PRIMARY] == ["scene_OA", "vqa_mOA", "referring_acc@0.5", "region_caption_rouge1"]


def test_grid_variants_cover_every_combination_with_safe_names():
    vs = exps.grid_variants({"distill.onpolicy.mix_alpha": ("0.2", "0.5"), "distill.pt_weight": ("1.0",)})
    assert [v.name for v in vs] == ["mix_alpha0p2_pt_weight1p0", "mix_alpha0p5_pt_weight1p0"]
    assert vs[1].overrides == ("distill.onpolicy.mix_alpha=0.5", "distill.pt_weight=1.0")


def test_sweep_table_ranks_by_mean_primary_metric():
    vs = exps.grid_variants({"distill.pt_weight": ("0.1", "1.0")})
    results = {
        vs[0].name: {"student_kd": _headline(scene=0.9, vqa=0.5, referring=0.2, region_caption=0.5)},
        vs[1].name: {"student_kd": _headline(scene=0.9, vqa=0.7, referring=0.2, region_caption=0.5)},
    }
    text, best = exps.sweep_table(results, vs)
    assert best == vs[1]
    assert text.splitlines()[2].startswith("| distill.pt_weight=1.0 | 90.0 | 70.0 | 20.0 | 50.0 | 57.5 |")
    assert "KD − control" not in text  # the control was not re-run: its metrics are the committed run's


def test_sweep_table_gives_kd_minus_control_when_the_grid_reran_it():
    vs = exps.grid_variants({"distill.train.lr": ("0.0005", "0.001")})
    results = {
        vs[0].name: {
            "student_kd": _headline(scene=0.6, vqa=0.6, referring=0.2, region_caption=0.6),
            "student_control": _headline(scene=0.4, vqa=0.6, referring=0.2, region_caption=0.6),
        },
        vs[1].name: {
            "student_kd": _headline(scene=0.7, vqa=0.6, referring=0.2, region_caption=0.6),
            "student_control": _headline(scene=0.8, vqa=0.6, referring=0.2, region_caption=0.6),
        },
    }
    text, best = exps.sweep_table(results, vs, with_control=True)
    assert best == vs[1]  # ranked by KD's score; the gain column says the control gained more there
    lines = text.splitlines()
    assert lines[0].endswith("| mean (score) | KD − control |")
    assert lines[2].endswith("| 52.5 | -2.5 |") and lines[3].endswith("| 50.0 | +5.0 |")
    pick = exps.sweep_pick(results, vs, best, with_control=True)
    assert pick.startswith("Best on val: distill.train.lr=0.001.")
    assert "gains most on its control at distill.train.lr=0.0005 (+5.0)" in pick
    assert "gains most" not in exps.sweep_pick(results, vs, best, with_control=False)


def test_seeds_table_paired_differences_gap_and_goal():
    base = {
        "teacher": _headline(scene=0.9, vqa=0.8, referring=0.6, region_caption=0.7),
        "student_sft": _headline(scene=0.5, vqa=0.4, referring=0.2, region_caption=0.5),
    }
    runs = []
    for kd_vqa, control_vqa in ((0.70, 0.50), (0.60, 0.50)):
        runs.append(
            {
                **base,
                "student_control": _headline(scene=0.6, vqa=control_vqa, referring=0.3, region_caption=0.6),
                "student_kd": _headline(scene=0.8, vqa=kd_vqa, referring=0.3, region_caption=0.65),
            }
        )
    text, summary = exps.seeds_table(base, runs)
    vqa = next(r for r in text.splitlines() if r.startswith("| VQA mOA"))
    # KD 65.0 ± 7.1, KD - control +15.0 ± 7.1, KD - baseline +25.0 ± 7.1, gap 40 -> 62%
    assert vqa == "| VQA mOA | 80.0 | 40.0 | 50.0 ± 0.0 | 65.0 ± 7.1 | +15.0 ± 7.1 | +25.0 ± 7.1 | 62% |"
    # scene, VQA and captions beat the control in every seed; referring ties (not a win).
    assert "on 3 of 4 tasks (scene OA, VQA mOA, region caption ROUGE-1)" in summary
    # gap closed on the primaries: scene 75%, VQA 62.5%, referring 25%, captions 75% -> 59%: goal met.
    assert "59% of the teacher-baseline gap" in summary and "met." in summary and "NOT" not in summary


def test_seeds_table_says_plainly_when_goal_is_missed():
    base = {"teacher": _headline(scene=0.9), "student_sft": _headline(scene=0.5)}
    run = {**base, "student_control": _headline(scene=0.6), "student_kd": _headline(scene=0.55)}
    _, summary = exps.seeds_table(base, [run])
    assert "on 0 of 4 tasks (none)" in summary and "NOT met" in summary


class FakeDvc:
    """Records `dvc` calls; `exp show` answers from ``self.exps`` (name -> state) and queueing adds one."""

    def __init__(self, exps_: dict[str, str], flaky_shows: Sequence[Exception] = ()) -> None:
        self.exps, self.calls, self.flaky_shows = dict(exps_), [], list(flaky_shows)

    def __call__(self, *args: str, capture: bool = False, timeout: float | None = None) -> str:
        self.calls.append(args)
        if args[:2] == ("exp", "show"):
            assert timeout is not None  # a hung `exp show` must not hang the command
            if ("queue", "start", "-j", "1") in self.calls and self.flaky_shows:
                raise self.flaky_shows.pop(0)  # as while a worker lays out its workspace, or a hung read
            rows = [
                {
                    "name": n,
                    "revs": [
                        {
                            "name": n,
                            "data": {
                                "metrics": {
                                    "metrics/student_kd.json": {"data": {"headline": {"vqa_mOA": 0.5}}}
                                }
                            },
                        }
                    ],
                    "executor": {"state": s, "local": {"log": f"{n}.out"}},
                }
                for n, s in self.exps.items()
            ]
            return json.dumps(
                [{"rev": "workspace", "experiments": None}, {"rev": "abc", "experiments": rows}]
            )
        if args[:3] == ("exp", "run", "--queue"):
            self.exps[args[4]] = "queued"
        if args[:2] == ("exp", "remove"):
            del self.exps[args[2]]
        if args[:2] == ("queue", "start"):
            self.exps = {n: "failed" if n.startswith("bad") else "success" for n in self.exps}
        return ""


def test_run_queue_reuses_done_requeues_failed_and_reports_failures(monkeypatch):
    flaky = [subprocess.CalledProcessError(255, "dvc"), subprocess.TimeoutExpired("dvc", 300)]
    fake = FakeDvc({"old": "success", "broken": "failed"}, flaky_shows=flaky)
    monkeypatch.setattr(exps, "_dvc", fake)
    got = exps.run_queue(
        {"old": ("a=1",), "broken": ("a=2",), "new": ("a=3",)}, ["evaluate@student_kd"], poll=0
    )
    assert got["new"] == {"student_kd": {"vqa_mOA": 0.5}}
    queued = [c for c in fake.calls if c[:3] == ("exp", "run", "--queue")]
    assert [c[4] for c in queued] == ["broken", "new"]  # "old" is reused
    assert queued[1] == ("exp", "run", "--queue", "-n", "new", "-S", "a=3", "evaluate@student_kd")
    assert ("exp", "remove", "broken") in fake.calls and ("queue", "start", "-j", "1") in fake.calls

    fake = FakeDvc({})
    monkeypatch.setattr(exps, "_dvc", fake)
    with pytest.raises(RuntimeError, match=r"bad1 \(log: bad1.out\).*re-run the same command"):
        exps.run_queue({"bad1": (), "ok": ()}, [], poll=0)


def test_every_override_names_a_key_of_the_shipped_params_yaml():
    """`dvc exp run -S key=value` refuses a key the file lacks (the sweep failed so on its first real run)."""
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    overrides = [o for v in exps.ABLATIONS for o in v.overrides]
    overrides += [o for v in exps.grid_variants(exps.SWEEP_GRID) for o in v.overrides]
    for key in (o.split("=", 1)[0] for o in overrides):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not in params.yaml"
            node = node[part]


def test_control_reads_are_the_control_stages_params_in_dvc_yaml():
    """The sweep re-runs the control for a grid over these keys: they must be what its stage reads."""
    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]
    assert sorted(exps.CONTROL_READS) == sorted(f"{p}." for p in stages["student_control"]["params"])


def test_ablations_cover_the_issue_rows():
    names = {v.name for v in exps.ABLATIONS}
    assert {
        "full",
        "paper_unit_weights",
        "no_onpolicy",
        "no_align",
        "no_pt",
        "forward_kl",
        "k4",
        "k16",
        "k64",
        "no_gt_ce",
    } <= names


def _distill_with(overrides: Sequence[str]) -> dict:
    """The shipped params.yaml's distill section after ``-S`` overrides (numbers as YAML reads them)."""
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    for o in overrides:
        key, value = o.split("=", 1)
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = yaml.safe_load(value)
    return params["distill"]


def test_paper_variants_are_the_papers_objective():
    """The default adds ground-truth CE; the paper's variants take it out, and paper_unit_weights weighs
    every term of the paper's Table 1 with 1."""
    variants = {v.name: v for v in exps.ABLATIONS}
    assert _distill_with(variants["full"].overrides)["sft_weight"] > 0
    assert _distill_with(variants["no_gt_ce"].overrides)["sft_weight"] == 0
    d = _distill_with(variants["paper_unit_weights"].overrides)
    assert d["sft_weight"] == 0 and d["kl"] == "reverse" and d["onpolicy"]["enabled"] is True
    on = d["onpolicy"]
    weights = (d["kl_weight"], d["align_weight"], d["pt_weight"], on["single_weight"], on["long_weight"])
    assert weights == (1,) * 5


FAKE_STAGE = """
import json, sys
from pathlib import Path
import yaml
p = yaml.safe_load(open("params.yaml"))
d, model = p["distill"], sys.argv[1]
seed, pt = d["train"]["seed"], d["pt_weight"]
val = 0.05 if p["eval"]["split"] == "val" else 0.0
level = {"teacher": 0.8, "student_sft": 0.4, "student_control": 0.45 + 0.01 * seed,
         "student_kd": 0.5 + 0.1 * pt + 0.02 * seed + val + 0.001 * p["cache"]["k"]}[model]
Path("metrics").mkdir(exist_ok=True)
Path(f"metrics/{model}.json").write_text(json.dumps({"headline": {k: level for k in %r}}))
"""


@pytest.mark.slow
def test_commands_end_to_end_with_dvc_queue(tmp_path, monkeypatch):
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage.py").write_text(FAKE_STAGE % [h.key for h in HEADLINE])
    params = {
        "distill": {"pt_weight": 0.1, "align_weight": 1.0, "train": {"seed": 0}},
        "eval": {"split": "test"},
        "cache": {"k": 16},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text(
        textwrap.dedent(f"""\
        stages:
          evaluate:
            foreach: {list(exps.MODELS)}
            do:
              cmd: {sys.executable} stage.py ${{item}}
              deps: [stage.py]
              params: [distill, eval, cache]
              metrics:
                - metrics/${{item}}.json:
                    cache: false
        """)
    )
    for cmd in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
        [sys.executable, "-m", "dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "baseline run"],
    ):
        subprocess.run(cmd, check=True, env={**os.environ, **env})

    sweep = exps.sweep(exps.grid_variants({"distill.pt_weight": ("0.1", "1.0")}), jobs=2, poll=2)
    assert "Best on val: distill.pt_weight=1.0." in sweep.read_text()
    # val adds 0.05 in the fake: the sweep really evaluated on val (0.5 + 0.1 + 0.05 + 0.016).
    assert json.loads((tmp_path / "reports/experiments/sweep.json").read_text())["pt_weight1p0"][
        "student_kd"
    ]["vqa_mOA"] == pytest.approx(0.666)
    # A grid over what the control shares re-runs the control on val too: kd 0.5 + 0.01 + 0.05 + 0.016 +
    # 0.02 (seed 1) = 0.596, control 0.46 (its fake has no val shift) -> +13.6.
    lr = exps.sweep(exps.grid_variants({"distill.train.seed": ("1",)}), poll=2).read_text()
    assert lr.splitlines()[4].endswith("| 59.6 | +13.6 |")

    seeds = exps.seeds([0, 1], jobs=2, poll=2).read_text()
    # kd 0.526 / 0.546, control 0.45 / 0.46 -> kd - control +8.1 ± 0.7; gap 0.4 -> 34% closed
    assert "| VQA mOA | 80.0 | 40.0 | 45.5 ± 0.7 | 53.6 ± 1.4 | +8.1 ± 0.7 | +13.6 ± 1.4 | 34% |" in seeds

    no_pt = [v for v in exps.ABLATIONS if v.name == "no_pt"]
    ablations = exps.ablations(no_pt, [0], poll=2)
    rows = {
        r.split(" | ")[0].strip("| "): r for r in ablations.read_text().splitlines() if r.startswith("| ")
    }
    assert "| 51.6 |" in rows["no_pt"]  # 0.5 + 0 + 0.016
    # The committed run's teacher/baseline/control rows come first, from the workspace's metrics.
    assert "| 80.0 |" in rows["(teacher)"]
    # A second call finds every experiment done on this HEAD and runs nothing.
    before = subprocess.run([sys.executable, "-m", "dvc", "exp", "ls"], capture_output=True, text=True).stdout
    exps.ablations(no_pt, [0], poll=2)
    assert (
        subprocess.run([sys.executable, "-m", "dvc", "exp", "ls"], capture_output=True, text=True).stdout
        == before
    )
