"""Reading the VAR parity fixtures of tests/fixtures/var (made by make_var_fixtures.py)."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ddjax.teacher.var.loading import var_from_state_dict, vqvae_from_state_dict
from ddjax.teacher.var.model import VARConfig, var_config
from ddjax.teacher.var.vqvae import VQVAEConfig, vqvae_config

FIXTURES = Path(__file__).parent / "fixtures" / "var"


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


var_weights = _load_module("var_weights", FIXTURES / "var_weights.py")


@cache
def meta() -> dict:
    return json.loads((FIXTURES / "meta.json").read_text())


def arrays(case: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{case}.npz") as z:
        return {k: z[k] for k in z.files}


def vae_cfg(spec: dict) -> VQVAEConfig:
    return vqvae_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})


def var_cfg(spec: dict) -> VARConfig:
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return var_config(spec["depth"], drop_path_rate=0.0, cond_drop_rate=0.0, **{
        k: v for k, v in spec.items() if k != "depth"})


def seeded_vae(shapes: dict, seed: int, cfg: VQVAEConfig, codebook_std: float = 1.0,
               fingerprints: dict | None = None) -> Any:
    state = var_weights.seeded_state_dict(shapes, seed, codebook_std)
    if fingerprints:
        bad = var_weights.check_fingerprints(state, fingerprints)
        assert not bad, f"the seeded weight generator changed (regenerate the fixtures): {bad[:5]}"
    return vqvae_from_state_dict(state, cfg, source=f"seeded {seed}")


def seeded_var(shapes: dict, seed: int, cfg: VARConfig) -> Any:
    return var_from_state_dict(var_weights.seeded_state_dict(shapes, seed), cfg, source=f"seeded {seed}")


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def load_case(name: str):
    """(name, meta, vae config, var config, vae params, var params, arrays) of a fixture case."""
    m = meta()[name]
    vcfg, tcfg = vae_cfg(m["vae"]), var_cfg(m["var"])
    vae = seeded_vae(m["vae_shapes"], m["seed"], vcfg)
    var = seeded_var(m["var_shapes"], m["seed"] + 1, tcfg)
    return name, m, vcfg, tcfg, vae, var, arrays(name)
