"""Write the comparison report: the paper's tables for every evaluated model, side by side, and figures.

    python stages/report.py     # metrics/, reports/eval/, dvclive/ -> reports/report.md, reports/figures/

Reads no params. A model that has not been evaluated is skipped and named in the report.
"""

from pathlib import Path

from geodistill.eval.report import write_report

if __name__ == "__main__":
    print(f"wrote {write_report(Path('.'))}")
