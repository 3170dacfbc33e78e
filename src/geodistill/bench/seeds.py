"""Paired multi-seed comparison: distilled student vs the equal-compute control, per seed.

    python -m geodistill.bench.seeds --seeds 0 1 2 [--set distill.kl=forward ...]

For each seed it runs ``dvc exp run -S distill.train.seed=<seed>`` (teacher, cache and baseline are
reused; control and distilled student share the baseline init and the seed's batch order), reads
metrics/student_kd.json and metrics/student_control.json of that experiment, and prints each headline
metric per seed plus the mean and standard deviation of the paired difference (kd - control).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from geodistill.eval.tasks import HEADLINE


def run_seed(seed: int, extra: list[str]) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, "-m", "dvc", "exp", "run", "-S", f"distill.train.seed={seed}"]
    for s in extra:
        cmd += ["-S", s]
    subprocess.run(cmd, check=True)
    # `dvc exp run` leaves the workspace at the experiment's results.
    return {
        m: json.loads(Path(f"metrics/{m}.json").read_text())["headline"]
        for m in ("student_control", "student_kd")
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="extra -S overrides for every run")
    ap.add_argument("--out", default="reports/seeds.json")
    args = ap.parse_args(argv)
    results = {seed: run_seed(seed, args.set) for seed in args.seeds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2) + "\n")
    print(
        f"{'metric':24s} "
        + " ".join(f"{'seed ' + str(s):>17s}" for s in args.seeds)
        + "   kd-control mean ± sd"
    )
    for key in (h.key for h in HEADLINE):
        cells, diffs = [], []
        for s in args.seeds:
            c, k = results[s]["student_control"].get(key), results[s]["student_kd"].get(key)
            if c is None or k is None:
                cells.append(f"{'n/a':>17s}")
                continue
            cells.append(f"{100 * c:7.1f} / {100 * k:7.1f}")
            diffs.append(100 * (k - c))
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        mean = statistics.mean(diffs) if diffs else float("nan")
        print(f"{key:24s} " + " ".join(cells) + f"   {mean:+.1f} ± {sd:.1f}")
    print("(cells: control / kd, in %; differences in points)")


if __name__ == "__main__":
    main()
