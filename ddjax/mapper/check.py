"""Interim: agreement of flow settings with a reference integration (replaced by the full check)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from ddjax.mapper.flow import FlowSettings, map_token


class FlowCheckError(ValueError):
    """The flow settings disagree with the reference map too often."""


@dataclasses.dataclass(frozen=True)
class FlowCheck:
    agreement: float
    num_tokens: int
    settings: FlowSettings
    reference: FlowSettings
    threshold: float

    @property
    def passed(self) -> bool:
        return self.agreement >= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"agreement": self.agreement, "num_tokens": self.num_tokens, "threshold": self.threshold,
                "reference": dataclasses.asdict(self.reference)}


REFERENCE = FlowSettings(solver="rk4", num_steps=64, t_min=1e-4, prune_t=None)


def check_flow(log_p, codebook, settings: FlowSettings, *, noise, reference: FlowSettings | None = None,
               threshold: float = 0.999) -> FlowCheck:
    reference = reference or REFERENCE
    a = np.asarray(map_token(jnp.asarray(noise), jnp.asarray(log_p), jnp.asarray(codebook), settings))
    b = np.asarray(map_token(jnp.asarray(noise), jnp.asarray(log_p), jnp.asarray(codebook), reference))
    return FlowCheck(float((a == b).mean()), len(a), settings, reference, threshold)


def require_flow(check: FlowCheck) -> None:
    if not check.passed:
        raise FlowCheckError(f"flow map agrees with the reference on {check.agreement:.4f} < "
                             f"{check.threshold} of {check.num_tokens} teacher tokens")
