"""Normalise the instruction data into JSONL splits, images and a validation report.

    python stages/prepare.py            # -> data/prepared/

Reads params `data.*`: the embedded synthetic benchmark, or GeoChat-format JSON + an image folder.
"""

from pathlib import Path

from geodistill.config import load_section
from geodistill.data.prepare import prepare

OUT = Path("data/prepared")

if __name__ == "__main__":
    report = prepare(load_section("data"), OUT)
    print(f"prepared {report['records']} from {report['source']}")
    print(f"skipped {report['skipped']} bad records (see {OUT}/report.json)")
