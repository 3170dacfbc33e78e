import ast
import dataclasses
import inspect
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
    with pytest.raises(ConfigError, match="kl must be one of"):
        config.from_dict(config.DistillConfig, {"kl": "backward"}, "distill")


def test_configs_are_frozen():
    cfg = config.from_dict(config.ShardConfig, {}, "shard")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.maxcount = 3  # type: ignore[misc]


def test_missing_params_file_says_where_to_run(tmp_path):
    with pytest.raises(ConfigError, match="project root"):
        config.load_section("data", tmp_path / "params.yaml")
