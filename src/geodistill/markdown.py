"""Markdown output shared by the report and the benchmark commands."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (first column left-aligned, the rest right-aligned)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":--"] + ["--:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
