r"""Entry point: python -m ddjax.main --config=configs/llamagen.py[:ARG] --workdir=DIR

Defines flags, initialises multi-host JAX when asked, logs the devices and hands the
config to `ddjax.app.run`. Override any field: --config.mode=sample_teacher
--config.teacher.checkpoint=/ckpts/c2i_B_256.pt
"""

from __future__ import annotations

import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddjax.app import run as app_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/llamagen.py[:preset]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, pairs and checkpoints go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU)."
)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(std_logging.Filter):
    """Drops the INFO chatter of Orbax and absl's checkpoint plumbing; warnings still pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        handler.addFilter(_QuietLibraries())
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
                 jax.process_count(), jax.devices())
    try:
        app_run(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # Configuration and input problems: one clear line, no traceback.
        logging.error("%s: %s", type(e).__name__, e)
        raise SystemExit(2) from e


def entry():
    app.run(main)


if __name__ == "__main__":
    entry()
