"""Loading the repository's `configs/*.py` from Python (notebooks, scripts).

    from ddjax.configs_path import load_config
    config = load_config("llamagen", "tiny,mode=all")   # = get_config("tiny,mode=all")

The folder is found from $DDJAX_CONFIGS, the checkout this package was installed from
(`pip install -e .`), or ./configs.
"""

from __future__ import annotations

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
