import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from geodistill import config
from geodistill.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_yaml_is_valid():
    loaded = config.load_all(ROOT / "params.yaml")
    assert set(loaded) == set(config.SECTIONS)


def test_every_config_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(config))
    missing = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(d, ast.Call) and getattr(d.func, "id", "") == "dataclass" for d in node.decorator_list
        ):
            body = node.body
            for i, stmt in enumerate(body):
                if isinstance(stmt, ast.AnnAssign):
                    nxt = body[i + 1] if i + 1 < len(body) else None
                    is_doc = isinstance(nxt, ast.Expr) and isinstance(
                        getattr(nxt, "value", None), ast.Constant
                    )
                    if not is_doc:
                        missing.append(f"{node.name}.{stmt.target.id}")
    assert not missing, f"fields without a docstring: {missing}"


def test_all_problems_reported_at_once(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(
        "data:\n  source: nowhere\n  bogus: 1\n  synthetic: {image_size: 60, grid: 8}\n"
        "cache: {k: 0}\nshard: {maxcount: many}\nmystery: {}\n"
    )
    with pytest.raises(ConfigError) as e:
        config.load_all(p)
    msg = str(e.value)
    for needle in [
        "data.source",
        "data.bogus: unknown key",
        "multiple of grid",
        "cache: k must be >= 1",
        "shard.maxcount: expected int",
        "mystery: unknown section",
    ]:
        assert needle in msg, needle


def test_types_are_checked_and_ints_widen_to_float():
    cfg = config.from_dict(config.DistillConfig, {"kl_weight": 2, "train": {"lr": 1}}, "distill")
    assert cfg.kl_weight == 2.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="expected bool"):
        config.from_dict(config.DistillConfig, {"onpolicy": {"enabled": "yes"}}, "distill")
    with pytest.raises(ConfigError, match=r"distill\.kl: must be one of \['reverse', .*got 'backward'"):
        config.from_dict(config.DistillConfig, {"kl": "backward"}, "distill")
    with pytest.raises(ConfigError, match="length_group must be >= 0"):
        config.from_dict(config.DistillConfig, {"train": {"length_group": -1}}, "distill")
    with pytest.raises(ConfigError, match=r"cache\.encoding: must be one of \['float32', .*got 'int4'"):
        config.from_dict(config.CacheConfig, {"encoding": "int4"}, "cache")


@pytest.mark.parametrize("name", sorted(config.SECTIONS))
def test_defaults_are_the_shipped_params_yaml(name):
    """One source: a section's dataclass defaults are exactly what params.yaml sets (so a benchmark or a
    test that uses the defaults runs the pipeline's settings)."""
    shipped = config.load_section(name, ROOT / "params.yaml")
    assert config.from_dict(config.SECTIONS[name], {}, name) == shipped
    assert config.SECTIONS[name]() == shipped


def test_long_stages_checkpoint_by_default():
    assert config.TeacherConfig().train.checkpoint_every == 100
    assert config.SftConfig().train.checkpoint_every == 100
    assert config.DistillConfig().train.checkpoint_every == 50


def test_a_nested_mapping_updates_its_own_sections_default():
    """teacher: {train: {steps: 7}} keeps the teacher's other loop settings, not a bare TrainConfig's."""
    changes = {"train": {"steps": 7}, "arch": {"num_layers": 2}}
    cfg = config.from_dict(config.TeacherConfig, changes, "teacher")
    assert cfg.train == dataclasses.replace(config.TeacherConfig().train, steps=7)
    assert cfg.arch == dataclasses.replace(config.TeacherConfig().arch, num_layers=2)
    assert config.TeacherConfig().train != config.TrainConfig()  # the case above can tell them apart
    student = config.from_dict(config.StudentConfig, {"arch": {"hidden_size": 128}}, "student")
    assert student.arch.num_layers == config.StudentConfig().arch.num_layers == 2


def test_an_architecture_without_a_default_must_be_complete():
    with pytest.raises(ConfigError) as e:
        config.from_dict(config.LlavaArch, {"hidden_size": 64}, "arch")
    assert "arch.patch_size: missing (this field has no default)" in str(e.value)


def test_configs_are_frozen():
    cfg = config.from_dict(config.ShardConfig, {}, "shard")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.maxcount = 3  # type: ignore[misc]


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="project root"):
        config.load_section("data", tmp_path / "params.yaml")


def test_reading_a_config_imports_neither_torch_nor_numpy():
    """Every stage imports config.py: its Literal types live here, not in the torch/numpy modules."""
    code = "import sys, geodistill.config; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_benchmark_sets_are_validated_all_at_once():
    """Several sets per task; every problem of every set in one error, unknown keys included."""
    raw = {"benchmarks": {
        "scene": [{"name": "aid", "dir": "/d/AID"}, {"name": "u cm", "dir": ""}],
        "vqa": [{"name": "lr", "dir": "/d/LR", "prefix": "LR_split_test", "image": "x"},
                {"name": "hr", "dir": "/d"}],
        "referring": [{"name": "geochat", "path": "r.jsonl", "image_dir": ""}],
        "grounding": [],
    }}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        config.from_dict(config.EvalConfig, raw, "eval")
    msg = str(e.value)
    for fragment in (
        "eval.benchmarks.grounding: unknown key (valid: referring, region_caption, scene, vqa)",
        "eval.benchmarks.vqa[0].image: unknown key",
        "eval.benchmarks.vqa[1].prefix: missing",
        "eval.benchmarks.scene[1]: name 'u cm' must be letters",
        "eval.benchmarks.scene[1]: dir is empty",
        "eval.benchmarks.referring[0]: image_dir is empty",
    ):
        assert fragment in msg, fragment
    ok = {"benchmarks": {"scene": [{"name": "aid", "dir": "/d/AID"}, {"name": "aid", "dir": "/d/UCM"}]}}
    with pytest.raises(ConfigError, match=r"scene: set names \['aid'\] repeat"):
        config.from_dict(config.EvalConfig, ok, "eval")
    two = {"benchmarks": {"scene": [{"name": "aid", "dir": "/d/AID"}, {"name": "ucm", "dir": "/d/UCM"}]}}
    cfg = config.from_dict(config.EvalConfig, two, "eval")
    assert [s.name for s in cfg.benchmarks.scene] == ["aid", "ucm"] and cfg.benchmarks.vqa == ()
