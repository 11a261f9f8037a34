"""The config, read once: every block becomes the frozen settings object its stage takes.

`read_settings(config)` runs before the first stage, so a bad value (a negative batch size, an
unknown field, a t_list that is not a step boundary) fails in seconds with the field's name,
not after an hour of pair generation. Stages never see the ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from ddjax.dd2.settings import DD2Settings, settings_from_dict
from ddjax.evaluate.report import EvalSettings
from ddjax.mapper.flow import FlowSettings
from ddjax.mapper.generate import PairSettings
from ddjax.student.sampling import DDSettings
from ddjax.student.train import TrainSettings
from ddjax.teacher.llamagen.sampling import SamplingSettings
from ddjax.teacher.var.sampling import VARSamplingSettings

T = TypeVar("T")

# config.teacher.family -> the settings class of its config.sampling block
SAMPLING = {"llamagen": SamplingSettings, "var": VARSamplingSettings}
# The families DD1 runs on (pair generation, the student, the report); the others sample only.
DD_FAMILIES = ("llamagen", "var")

METHODS = ("dd1", "dd2")

# config.sampling fields that are not SamplingSettings: how mode=sample_teacher runs.
SAMPLE_TEACHER_FIELDS = ("batch_size", "num_images", "labels")


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def from_block(cls: type[T], block: Any, name: str, *, ignore: tuple[str, ...] = ()) -> T:
    """cls(**config.<name>) with a clear error for unknown or wrongly typed fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: _value(v) for k, v in dict(block).items() if k not in ignore}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"config.{name} has unknown fields {unknown}; known: {sorted(names)}")
    try:
        return cls(**given)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.{name}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every stage's settings, read from one config."""

    sampling: SamplingSettings | VARSamplingSettings
    flow: FlowSettings
    data: PairSettings
    dd: DDSettings
    train: TrainSettings
    eval: EvalSettings
    sample_batch_size: int
    sample_num_images: int
    sample_labels: str | None
    method: str = "dd1"
    dd2: DD2Settings = DD2Settings()


def _dd2(config: Any) -> DD2Settings:
    if "dd2" not in config:
        return DD2Settings()
    try:
        return settings_from_dict({k: (dict(v) if hasattr(v, "items") else _value(v))
                                   for k, v in dict(config.dd2).items()})
    except TypeError as e:
        raise ValueError(f"config.dd2: {e}") from e


def read_settings(config: Any) -> Settings:
    """All settings of `config`; raises a ValueError naming the first bad field. A config
    without a block (configs/digits.py has no train block) gets that stage's defaults."""
    s = config.sampling
    family = config.teacher.get("family", "llamagen")
    if family not in SAMPLING:
        raise ValueError(f"config.teacher.family={family!r}; available: {sorted(SAMPLING)}")

    def block(cls: type[T], name: str) -> T:
        return from_block(cls, config[name], name) if name in config else cls()

    out = Settings(
        sampling=from_block(SAMPLING[family], s, "sampling", ignore=SAMPLE_TEACHER_FIELDS),
        flow=block(FlowSettings, "flow"),
        data=block(PairSettings, "data"),
        dd=block(DDSettings, "dd"),
        train=block(TrainSettings, "train"),
        eval=block(EvalSettings, "eval"),
        sample_batch_size=int(s.batch_size), sample_num_images=int(s.num_images),
        sample_labels=s.labels,
        method=config.get("method", "dd1"),
        dd2=_dd2(config),
    )
    if out.method not in METHODS:
        raise ValueError(f"config.method={out.method!r}; choose one of {METHODS}")
    if out.sample_batch_size <= 0 or out.sample_num_images <= 0:
        raise ValueError("config.sampling.batch_size and config.sampling.num_images must be positive")
    return out
