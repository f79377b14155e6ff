"""The config machinery rejects unknown keys and wrong types, naming the dotted field."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_trace.config_base import ConfigError, from_dict, load_yaml_config


@dataclass
class Inner:
    lr: float = 1e-6
    mode: Literal["a", "b"] = "a"
    clip: Optional[float] = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = "x"
    steps: int = 3
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"steps": 5, "inner": {"lr": 2, "clip": 0.05}, "tags": ["a"]})
    assert cfg.steps == 5 and cfg.inner.lr == 2.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.clip == 0.05 and cfg.tags == ["a"]


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"stepz": 1}, "stepz"),
        ({"inner": {"lrr": 1}}, "inner.lrr"),
        ({"steps": "many"}, "steps"),
        ({"steps": True}, "steps"),
        ({"inner": {"mode": "c"}}, "inner.mode"),
        ({"inner": {"lr": -1}}, "inner.lr"),
        ({"tags": [1]}, "tags[0]"),
    ],
)
def test_bad_values_name_the_field(data, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        from_dict(Outer, data)


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 4\ninner:\n  mode: b\n")
    cfg = load_yaml_config(Outer, p, ["inner.lr=0.5", "name=run1"])
    assert (cfg.steps, cfg.inner.mode, cfg.inner.lr, cfg.name) == (4, "b", 0.5, "run1")
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it.
    assert load_yaml_config(Outer, p, ["inner.lr=1e-3"]).inner.lr == 1e-3
    with pytest.raises(ConfigError, match="inner.lr"):
        load_yaml_config(Outer, p, ["inner.lr=fast"])
    with pytest.raises(ConfigError, match="inner.bogus"):
        load_yaml_config(Outer, p, ["inner.bogus=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_yaml_config(Outer, tmp_path / "missing.yaml")


@dataclass
class WithOptionalSection:
    inner: Optional[Inner] = None


def test_optional_section_reports_the_inner_field():
    assert from_dict(WithOptionalSection, {}).inner is None
    assert from_dict(WithOptionalSection, {"inner": {"lr": 3}}).inner.lr == 3.0
    with pytest.raises(ConfigError, match=r"inner\.lr"):
        from_dict(WithOptionalSection, {"inner": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"inner\.nope"):
        from_dict(WithOptionalSection, {"inner": {"nope": 1}})
