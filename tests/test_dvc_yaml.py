"""dvc.yaml discipline: every stage depends on its script and on exactly the geodistill modules it imports
(transitively), reads only params sections that exist, and a training stage's dvclive folder is named
after its model."""

import ast
from pathlib import Path

import yaml

from geodistill.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    base = SRC / Path(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def _imports(path: Path) -> set[Path]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] == "geodistill" and (f := _module_file(n)) is not None:
                found.add(f)
    return found


def _closure(script: Path) -> set[Path]:
    todo, seen = [script], set()
    while todo:
        for f in _imports(todo.pop()):
            if f not in seen:
                seen.add(f)
                todo.append(f)
    return seen


def _stages():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, st in spec.items():
        yield name, st.get("do", st)


def test_every_stage_depends_on_what_it_imports():
    missing = {}
    for name, st in _stages():
        script = ROOT / st["cmd"].split()[1]  # "python stages/<name>.py ..."
        deps = [ROOT / d.replace("${item}", "x") for d in st["deps"]]
        assert script in deps, f"{name}: its script {script.name} is not a dep"
        for mod in _closure(script):
            if mod.name == "__init__.py" and mod.parent == SRC / "geodistill":
                continue  # the empty package marker
            if not any(mod == d or d in mod.parents for d in deps):
                missing.setdefault(name, []).append(str(mod.relative_to(ROOT)))
    assert not missing, f"stages import modules they do not list as deps: {missing}"


def test_no_stage_depends_on_src_it_does_not_import():
    """A listed src/ package or module that the stage never imports re-runs it for nothing."""
    extra = {}
    for name, st in _stages():
        used = _closure(ROOT / st["cmd"].split()[1])
        for dep in st["deps"]:
            path = ROOT / dep
            if SRC in path.parents and not any(m == path or path in m.parents for m in used):
                extra.setdefault(name, []).append(dep)
    assert not extra, f"stages list src/ deps they do not import: {extra}"


def test_training_stages_log_to_dvclive_of_their_model():
    """dvclive/<model> for the stage that writes models/<model>; the report reads every one of them."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    logged = []
    for name, st in _stages():
        plots = [next(iter(p)) if isinstance(p, dict) else p for p in st.get("plots", [])]
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in st.get("metrics", [])]
        for path in [p for p in plots + metrics if p.startswith("dvclive/")]:
            model = path.split("/")[1]
            assert f"models/{model}" in st["outs"], f"{name}: logs to {path} but writes {st['outs']}"
            logged.append(model)
    assert sorted(set(logged)) == ["student_control", "student_kd", "student_sft", "teacher"]
    assert {f"dvclive/{m}" for m in logged} <= set(spec["report"]["deps"])


def test_stage_params_are_known_sections():
    for name, st in _stages():
        for p in st.get("params", []):
            assert p.split(".")[0] in SECTIONS, f"{name}: unknown params key {p}"
