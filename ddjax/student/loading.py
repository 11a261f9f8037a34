"""Loading DD student weights: official checkpoints (`.pt`/`.safetensors`) or ddjax directories."""

from __future__ import annotations

from typing import Any

from ddjax.teacher.loading import abstract_params, load_weights


def load_dd(path: str, config: Any, weights_key: str | None = None) -> Any:
    """DD student params for `config` (a `DDConfig`) from `.pt`, `.safetensors` or a ddjax
    directory.

    Released Distilled Decoding checkpoints hold the weights under "ema" and "model"; the EMA
    weights are taken unless `weights_key` says otherwise. Raises a CheckpointError naming
    every missing, unexpected or mis-shaped key.
    """
    from ddjax.student.model import init_params  # noqa: PLC0415

    return load_weights(path, abstract_params(init_params, config), "dd", weights_key)
