r"""Entry point: python -m ddjax.main --config=configs/llamagen.py[:ARG] --workdir=DIR

Defines flags, initialises multi-host JAX when asked (`--distributed`, detected or with
`--coordinator_address`, `--num_processes`, `--process_id`; README "Multi-host"), logs the
devices and hands the config to `ddjax.app.run`. Override any field: --config.mode=sample_teacher
--config.teacher.checkpoint=/ckpts/c2i_B_256.pt
"""

from __future__ import annotations

import logging as std_logging

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ddjax import sharding
from ddjax.app import run as app_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/llamagen.py[:preset]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs, pairs and checkpoints go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host TPU/GPU). Without the "
    "three flags below JAX detects the cluster (TPU pods, SLURM, Open MPI)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's id.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds", None, "With --distributed: a peer silent this long is lost and "
    "every other process stops with an error naming it (JAX's default: 100).")
_SHUTDOWN = flags.DEFINE_integer(
    "shutdown_timeout_seconds", None, "With --distributed: how long the exit barrier waits for "
    "the other processes (JAX's default: 300).")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_seconds", None, "With --distributed: how long to wait for every "
    "process to join (JAX's default: 300).")
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
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _DISTRIBUTED.value and any(v is not None for v in explicit):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed")
    if _DISTRIBUTED.value:
        sharding.initialize_distributed(*explicit, heartbeat_timeout_s=_HEARTBEAT.value,
                                        shutdown_timeout_s=_SHUTDOWN.value,
                                        initialization_timeout_s=_INIT_TIMEOUT.value)
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
