"""The entry layer: the only code that reads the config. It builds each object once
(teacher, meshes, pair dataset, student) and hands them to the stages (`modes.py`)."""

from ddjax.app.modes import ALL_MODES, MODES, Run, run
from ddjax.app.settings import Settings, read_settings

__all__ = ["ALL_MODES", "MODES", "Run", "Settings", "read_settings", "run"]
