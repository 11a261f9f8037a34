"""Loading the repository's `configs/*.py` from Python (notebooks, scripts).

    from ddjax.configs_path import apply_overrides, load_config
    config = load_config("llamagen", "tiny,mode=all")   # = get_config("tiny,mode=all")
    apply_overrides(config, ["train.lr=6e-3", "dd.t_list=(0, 30)"])   # dotted key=value

The folder is found from $DDJAX_CONFIGS, the checkout this package was installed from
(`pip install -e .`), or ./configs.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any


def config_dir() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for cand in (os.environ.get("DDJAX_CONFIGS"), os.path.join(here, "configs"),
                 os.path.join(os.getcwd(), "configs")):
        if cand and os.path.isfile(os.path.join(cand, "llamagen.py")):
            return cand
    raise FileNotFoundError("configs/ not found: install ddjax from a checkout (pip install -e .) "
                            "or set DDJAX_CONFIGS to the configs folder")


def load_config(name: str, arg: str | None = None) -> Any:
    """configs/<name>.py's get_config(arg)."""
    path = os.path.join(config_dir(), name + ".py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no config {name!r} in {config_dir()}")
    spec = importlib.util.spec_from_file_location(f"ddjax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def apply_overrides(config: Any, items: list[str]) -> Any:
    """Sets dotted `key=value` items on `config` in place (values parsed as Python literals,
    else kept as strings) and returns it; an item without "=" raises. Keys go through
    `update_from_flattened_dict`, so an unlocked config takes a new key without complaint."""
    flat = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {item!r} must be key=value")
        try:
            flat[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            flat[key] = value
    config.update_from_flattened_dict(flat)
    return config
