"""Experiments over the pipeline through DVC's queue: the validation sweep, paired seeds, ablations.

    python -m geodistill.exps sweep      [--grid distill.onpolicy.mix_alpha=0.1,0.2 ...] [--jobs 1]
    python -m geodistill.exps seeds      [--seeds 0 1 2] [--jobs 1]
    python -m geodistill.exps ablations  [--seeds 0 1 2] [--only no_align forward_kl ...] [--jobs 1]

Run them after a `dvc repro` whose dvc.lock is committed: every experiment is a `dvc exp run --queue` of
the same pipeline on top of HEAD (teacher, its cache and the baseline are reused, never recomputed), the
queue is run with `dvc queue start` and each command then reads its experiments' metrics back with
`dvc exp show --json` and writes ``reports/experiments/<command>.{md,json}``.

- ``sweep`` varies distillation settings on the **validation** split (``eval.split=val``; only distill and
  its evaluation run, plus the control's when the grid changes what it shares: ``distill.train``,
  ``student``) and ranks them by the mean of each task's primary metric. Test is never looked at.
- ``seeds`` re-runs the control and the distilled student with each ``distill.train.seed`` (same
  initialisation, the seed's batch order for both) and reports, per task, KD - control and KD - baseline
  with the spread over seeds, and the share of the teacher-baseline gap that KD closes.
- ``ablations`` runs each variant of :data:`ABLATIONS` (full method, without a term, forward KL, other k)
  for the given seeds and renders the ablation table.

Experiments are named ``<command>-<variant>-s<seed>``; one that already succeeded on this HEAD is reused,
so an interrupted command picks up where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geodistill.eval.tables import pct
from geodistill.eval.tasks import HEADLINE, PRIMARY
from geodistill.markdown import table

MODELS = ("teacher", "student_sft", "student_control", "student_kd")
OUT = Path("reports/experiments")
Metrics = dict[str, dict[str, float | None]]
"""model -> flat headline of metrics/<model>.json (what `dvc exp show` reads back)."""


@dataclass(frozen=True)
class Variant:
    """A named set of ``-S`` overrides of params.yaml."""

    name: str
    overrides: tuple[str, ...]
    what: str


ABLATIONS = (
    Variant("full", (), "default: cached reverse KL + on-policy terms + alignment + L_PT + ground-truth CE"),
    Variant("no_gt_ce", ("distill.sft_weight=0",), "the paper's objective: without the ground-truth CE"),
    Variant(
        "paper_unit_weights",
        (
            "distill.sft_weight=0",
            "distill.pt_weight=1.0",
            "distill.align_weight=1.0",
            "distill.kl_weight=1.0",
            "distill.onpolicy.single_weight=1.0",
            "distill.onpolicy.long_weight=1.0",
        ),
        "every term of the paper with weight 1, as in its Table 1 (no ground-truth CE)",
    ),
    Variant(
        "no_onpolicy", ("distill.onpolicy.enabled=false",), "without the on-policy terms (cached KL only)"
    ),
    Variant("no_align", ("distill.align_weight=0",), "without feature alignment"),
    Variant("no_pt", ("distill.pt_weight=0",), "without L_PT"),
    Variant("forward_kl", ("distill.kl=forward",), "forward KL on the cache instead of reverse"),
    Variant("k4", ("cache.k=4",), "teacher cache with top-4"),
    Variant("k16", ("cache.k=16",), "teacher cache with top-16"),
    Variant("k64", ("cache.k=64",), "teacher cache with top-64"),
)
"""The ablation table's rows (`k` variants rebuild the teacher cache once each)."""

SWEEP_GRID = {
    "distill.kl_weight": ("1.0", "4.0"),
    "distill.pt_weight": ("0.1", "1.0"),
    "distill.sft_weight": ("0.0", "1.0"),
}
"""The committed validation sweep: every combination of these values (8 points). Adam makes the step
size blind to the loss's overall scale, so what the weights set is the share of each term: the cached
KL's, L_PT's (unrelated text), and that of the ground-truth CE, which the paper's recipe leaves out.
A first sweep, mix_alpha {0.2, 0.5} x pt_weight {0.1, 1.0}, had its best point at mix_alpha 0.2 (README)."""


def grid_variants(grid: Mapping[str, Sequence[str]]) -> list[Variant]:
    """One variant per combination of the grid's values, named by them (``mix_alpha0p2_pt_weight1p0``)."""
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values, strict=True))
        out.append(
            Variant(
                name.replace(".", "p"),
                tuple(f"{k}={v}" for k, v in zip(keys, values, strict=True)),
                ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)),
            )
        )
    return out


SHOW_TIMEOUT_S = 300.0
"""Limit on one `dvc exp show`: it can hang for good while reading an active experiment's metrics (seen
once: pygit2's blob stream waiting forever, 17 min at 0 % CPU); a poll that times out is retried like a
failed one."""


def _dvc(*args: str, capture: bool = False, timeout: float | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        check=True,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        timeout=timeout,
    )
    return done.stdout if capture else ""


def experiments() -> dict[str, dict[str, Any]]:
    """The experiments of HEAD by name: ``{"state": ..., "metrics": Metrics, "log": path | None}``.

    ``state`` is DVC's executor state (queued, running, success, failed) or ``done`` for a finished
    experiment whose executor record is gone.
    """
    out: dict[str, dict[str, Any]] = {}
    for row in json.loads(_dvc("exp", "show", "--json", capture=True, timeout=SHOW_TIMEOUT_S)):
        for exp in row.get("experiments") or []:
            rev = exp["revs"][0]
            executor = exp.get("executor") or {}
            metrics = {}
            for path, entry in ((rev.get("data") or {}).get("metrics") or {}).items():
                model = Path(path).stem
                if model in MODELS and isinstance(entry.get("data"), Mapping):
                    metrics[model] = dict(entry["data"].get("headline") or {})
            out[exp.get("name") or rev["name"]] = {
                "state": executor.get("state") or "done",
                "metrics": metrics,
                "log": (executor.get("local") or {}).get("log"),
            }
    return out


def workspace_metrics() -> Metrics:
    """The committed run's metrics (the row every experiment is compared with)."""
    return {
        m: json.loads(p.read_text())["headline"] for m in MODELS if (p := Path(f"metrics/{m}.json")).exists()
    }


def run_queue(
    runs: Mapping[str, Sequence[str]], targets: Sequence[str], jobs: int = 1, poll: float = 10.0
) -> dict[str, Metrics]:
    """Queue every run (name -> overrides) not already done on HEAD, run the queue, wait, read the metrics.

    Raises with each failed experiment's log path when any fails.
    """
    have = experiments()
    for name, overrides in runs.items():
        state = have.get(name, {}).get("state")
        if state in ("success", "done"):
            print(f"{name}: done before on this HEAD, reused")
            continue
        if state is not None:  # failed, or left queued/running by an interrupted command
            _dvc("exp", "remove", name)
        _dvc("exp", "run", "--queue", "-n", name, *(a for o in overrides for a in ("-S", o)), *targets)
    if any(have.get(n, {}).get("state") not in ("success", "done") for n in runs):
        _dvc("queue", "start", "-j", str(jobs))
    misses = 0
    while True:
        try:
            have = experiments()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            # `exp show` can fail while a worker is still laying out its temporary workspace, or hang.
            misses += 1
            if misses > 5:
                raise
            time.sleep(poll)
            continue
        misses = 0
        states = {n: have.get(n, {}).get("state") for n in runs}
        if all(s not in ("queued", "running") for s in states.values()):  # None: gone, counted as failed
            break
        time.sleep(poll)
    failed = [f"{n} (log: {have[n]['log']})" for n, s in states.items() if s not in ("success", "done")]
    if failed:
        raise RuntimeError(
            "experiments failed: " + "; ".join(failed) + ". Fix the cause and re-run the same "
            "command: the ones that succeeded are reused."
        )
    return {n: have[n]["metrics"] for n in runs}


def _mean_sd(xs: Sequence[float], signed: bool = False) -> str:
    """Mean ± standard deviation over seeds, in points (the ± only with two or more)."""
    if not xs:
        return "–"
    m = 100 * statistics.mean(xs)
    return (f"{m:+.1f}" if signed else f"{m:.1f}") + (
        f" ± {100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else ""
    )


def _values(runs: Sequence[Metrics], model: str, key: str) -> list[float]:
    return [v for r in runs if isinstance(v := r.get(model, {}).get(key), float | int)]


def _score(metrics: Mapping[str, float | None]) -> float | None:
    """Mean of the tasks' primary metrics; None when one is missing."""
    vals = [metrics.get(h.key) for h in PRIMARY]
    nums = [x for x in vals if isinstance(x, float | int)]
    return sum(nums) / len(nums) if len(nums) == len(vals) else None


def _gain(metrics: Metrics) -> float | None:
    """KD's score minus the control's."""
    kd, control = _score(metrics.get("student_kd", {})), _score(metrics.get("student_control", {}))
    return None if kd is None or control is None else kd - control


def sweep_table(
    results: Mapping[str, Metrics], variants: Sequence[Variant], with_control: bool = False
) -> tuple[str, Variant | None]:
    """Each grid point's primary metrics on val and their mean (the score); the best point first.

    ``with_control`` (the grid varies what the control shares, so each point re-ran it on val) adds KD's
    score minus the control's: more steps or another lr lift both, so the score alone cannot say whether
    distillation gained on SFT. Without it, an experiment's control metrics are the committed run's (test).
    """
    scored = []
    for v in variants:
        kd = results[v.name].get("student_kd", {})
        scored.append((_score(kd), v, [kd.get(h.key) for h in PRIMARY]))
    scored.sort(key=lambda t: -1.0 if t[0] is None else t[0], reverse=True)
    rows = []
    for score, v, vals in scored:
        row = [v.what, *(pct(x) for x in vals), pct(score)]
        if with_control:
            gain = _gain(results[v.name])
            row.append("–" if gain is None else f"{100 * gain:+.1f}")
        rows.append(row)
    best = scored[0][1] if scored and scored[0][0] is not None else None
    headers = ["settings (val split)", *(h.label for h in PRIMARY), "mean (score)"]
    return table(headers + (["KD − control"] if with_control else []), rows), best


def seeds_table(base: Metrics, runs: Sequence[Metrics]) -> tuple[str, str]:
    """Per task: the four models, KD - control and KD - baseline (mean ± sd over seeds), gap closed.

    The teacher and the baseline do not depend on ``distill.train.seed``; they come from each run (equal to
    the committed run's) and fall back to ``base``.
    """
    rows, wins, closed = [], [], []
    for h in HEADLINE:
        teacher = _values(runs, "teacher", h.key) or _values([base], "teacher", h.key)
        sft = _values(runs, "student_sft", h.key) or _values([base], "student_sft", h.key)
        control, kd = _values(runs, "student_control", h.key), _values(runs, "student_kd", h.key)
        if not (teacher and sft and control and kd) or len(control) != len(kd):
            continue
        t, b = statistics.mean(teacher), statistics.mean(sft)
        vs_control = [k - c for k, c in zip(kd, control, strict=True)]
        vs_sft = [k - b for k in kd]
        gap = t - b
        share = statistics.mean(vs_sft) / gap if gap > 0 else None
        rows.append(
            [
                h.label,
                pct(t),
                pct(b),
                _mean_sd(control),
                _mean_sd(kd),
                _mean_sd(vs_control, True),
                _mean_sd(vs_sft, True),
                "–" if share is None else f"{100 * share:.0f}%",
            ]
        )
        if h in PRIMARY:
            wins.append((h.label, all(d > 0 for d in vs_control)))
            if share is not None:
                closed.append(share)
    n_won = sum(w for _, w in wins)
    mean_closed = statistics.mean(closed) if closed else None
    goal = n_won >= 3 and mean_closed is not None and mean_closed >= 0.5
    won = ", ".join(lab for lab, w in wins if w) or "none"
    share = "–" if mean_closed is None else f"{100 * mean_closed:.0f}%"
    summary = (
        f"Over {len(runs)} paired seed(s), KD beats the equal-compute control in every seed on {n_won} of "
        f"{len(wins)} tasks ({won}); on the tasks' primary metrics where the teacher leads, KD closes "
        f"{share} of the teacher-baseline gap on average. Goal (>= 3 tasks and >= 50%): "
        f"{'met' if goal else 'NOT met'}."
    )
    headers = ["metric", "teacher", "baseline", "control", "KD", "KD − control", "KD − baseline"]
    headers.append("gap closed")
    return table(headers, rows), summary


def ablation_table(
    base: Metrics, results: Mapping[str, Sequence[Metrics]], variants: Sequence[Variant]
) -> str:
    """One row per variant (mean ± sd over its seeds) of student_kd's primary metrics, the committed run's
    teacher, baseline and control first."""
    rows = [
        [f"({m})", "", *(pct(base.get(m, {}).get(h.key)) for h in PRIMARY)]
        for m in ("teacher", "student_sft", "student_control")
    ]
    for v in variants:
        rows.append(
            [v.name, v.what, *(_mean_sd(_values(results[v.name], "student_kd", h.key)) for h in PRIMARY)]
        )
    return table(["variant", "what", *(h.label for h in PRIMARY)], rows)


def _write(name: str, markdown: str, data: Any) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    path = OUT / f"{name}.md"
    path.write_text(markdown + "\n")
    print(markdown)
    return path


def sweep_pick(
    results: Mapping[str, Metrics], variants: Sequence[Variant], best: Variant | None, with_control: bool
) -> str:
    """The sweep's verdict: its best point, and the point where KD gains most on the control if another."""
    if best is None:
        return "no grid point has all metrics"
    pick = f"Best on val: {best.what}. Make it the default (params.yaml, `distill`) before `dvc repro`."
    if not with_control:  # the experiments' control metrics are the committed run's: no gain to name
        return pick
    gains = {v: g for v in variants if (g := _gain(results[v.name])) is not None}
    if gains and (top := max(gains, key=lambda v: gains[v])) != best:
        pick += (
            f" Distillation gains most on its control at {top.what} ({100 * gains[top]:+.1f}): where the"
            " points differ in compute (steps, lr), the control gains too, so weigh both columns."
        )
    return pick


CONTROL_READS = ("student.", "distill.train.")
"""Params the equal-compute control shares with distillation: its stage's params in dvc.yaml, as prefixes
(a test keeps the two equal)."""


def sweep(variants: Sequence[Variant], jobs: int = 1, **kw: Any) -> Path:
    runs = {f"sweep-{v.name}": (*v.overrides, "eval.split=val") for v in variants}
    with_control = any(o.startswith(CONTROL_READS) for v in variants for o in v.overrides)
    targets = ["evaluate@student_kd", *(["evaluate@student_control"] if with_control else [])]
    got = run_queue(runs, targets, jobs, **kw)
    results = {v.name: got[f"sweep-{v.name}"] for v in variants}
    text, best = sweep_table(results, variants, with_control)
    pick = sweep_pick(results, variants, best, with_control)
    return _write("sweep", f"# Validation sweep (distill settings, val split)\n\n{text}\n\n{pick}", results)


def seeds(seed_list: Sequence[int], jobs: int = 1, **kw: Any) -> Path:
    runs = {f"seeds-full-s{s}": (f"distill.train.seed={s}",) for s in seed_list}
    got = run_queue(runs, [], jobs, **kw)
    text, summary = seeds_table(workspace_metrics(), list(got.values()))
    return _write("seeds", f"# Paired seeds {list(seed_list)} (test split)\n\n{text}\n\n{summary}", got)


def ablations(variants: Sequence[Variant], seed_list: Sequence[int], jobs: int = 1, **kw: Any) -> Path:
    runs = {
        f"abl-{v.name}-s{s}": (*v.overrides, f"distill.train.seed={s}") for v in variants for s in seed_list
    }
    got = run_queue(runs, ["evaluate@student_kd"], jobs, **kw)
    results = {v.name: [got[f"abl-{v.name}-s{s}"] for s in seed_list] for v in variants}
    text = ablation_table(workspace_metrics(), results, variants)
    return _write(
        "ablations", f"# Ablations, seeds {list(seed_list)} (test split, student_kd)\n\n{text}", results
    )


def _parse_grid(items: Iterable[str]) -> dict[str, tuple[str, ...]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise SystemExit(f"--grid {item!r}: expected key=value1,value2,...")
        grid[key] = tuple(values.split(","))
    return grid


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable[[argparse.Namespace], Path]] = {
        "sweep": lambda a: sweep(grid_variants(_parse_grid(a.grid) if a.grid else SWEEP_GRID), a.jobs),
        "seeds": lambda a: seeds(a.seeds, a.jobs),
        "ablations": lambda a: ablations(
            [v for v in ABLATIONS if not a.only or v.name in a.only], a.seeds, a.jobs
        ),
    }
    for name in commands:
        p = sub.add_parser(name)
        p.add_argument("--jobs", type=int, default=1, help="queue workers (each a whole pipeline run)")
    sub.choices["sweep"].add_argument(
        "--grid", action="append", default=[], help="key=v1,v2 (replaces SWEEP_GRID)"
    )
    sub.choices["seeds"].add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sub.choices["ablations"].add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sub.choices["ablations"].add_argument("--only", nargs="+", choices=[v.name for v in ABLATIONS])
    args = ap.parse_args(argv)
    print(f"wrote {commands[args.command](args)}")


if __name__ == "__main__":
    main()
