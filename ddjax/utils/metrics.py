"""Metric writers for every trainer: clu's writers, with a TensorBoard backend without TensorFlow.

clu's SummaryWriter needs TensorFlow, which ddjax does not depend on; without it tensorboardX
writes the event files (`import_clu`), and with neither the metrics go to the log only.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from typing import Any

import jax
import numpy as np
from absl import logging


@functools.cache
def _tensorboardx_writer_class() -> type:
    import tensorboardX  # optional: only when TensorFlow is absent
    from clu.metric_writers import interface  # before the shim is in place

    class TensorboardXWriter(interface.MetricWriter):
        """clu MetricWriter writing TensorBoard event files with tensorboardX (no TensorFlow)."""

        def __init__(self, logdir: str):
            self._logdir, self._files = logdir, 0
            self._open = self._new_file()  # the directory and first file exist from the start

        def _new_file(self):
            # a numbered suffix: two files opened in one second stay apart
            w = tensorboardX.SummaryWriter(logdir=self._logdir, filename_suffix=f".{self._files}")
            self._files += 1
            return w

        @property
        def _writer(self):
            if self._open is None:
                self._open = self._new_file()
            return self._open

        def write_summaries(self, step, values, metadata=None):
            logging.log_first_n(logging.WARNING, "TensorboardXWriter skips raw summaries", 1)

        def write_scalars(self, step, scalars):
            for k, v in scalars.items():
                self._writer.add_scalar(k, float(np.asarray(v)), global_step=step)

        def write_images(self, step, images):
            for k, v in images.items():
                v = np.asarray(v)
                fmt = "NHWC" if v.ndim == 4 else "HWC"
                (self._writer.add_images if v.ndim == 4 else self._writer.add_image)(
                    k, v, global_step=step, dataformats=fmt)

        def write_videos(self, step, videos):
            logging.log_first_n(logging.WARNING, "TensorboardXWriter skips videos", 1)

        def write_audios(self, step, audios, *, sample_rate):
            for k, v in audios.items():
                self._writer.add_audio(k, np.asarray(v), global_step=step, sample_rate=sample_rate)

        def write_texts(self, step, texts):
            for k, v in texts.items():
                self._writer.add_text(k, v, global_step=step)

        def write_histograms(self, step, arrays, num_buckets=None):
            for k, v in arrays.items():
                bins = None if num_buckets is None else num_buckets.get(k)
                self._writer.add_histogram(k, np.asarray(v), global_step=step, bins="auto",
                                           max_bins=bins)

        def write_hparams(self, hparams):
            text = "\n".join(f"    {k} = {v!r}" for k, v in sorted(hparams.items()))
            self._writer.add_text("hparams", text, global_step=0)

        def flush(self):
            # tensorboardX's flush() leaves the events still queued for its writer thread, so a
            # process killed after it loses them; closing drains the queue and the file, and the
            # next write opens a new file.
            self.close()

        def close(self):
            if self._open is not None:
                self._open.close()
                self._open = None

    return TensorboardXWriter


def _summary_writer_shim(logdir: str):
    """clu's `SummaryWriter(logdir)` when TensorFlow is absent: tensorboardX or an ImportError."""
    if not _importable("tensorboardX"):
        raise ImportError("TensorBoard summaries need tensorflow or tensorboardX installed")
    return _tensorboardx_writer_class()(logdir)


def import_clu() -> tuple[Any, Any]:
    """(clu.metric_writers, clu.periodic_actions). Both import clu's TF summary writer module,
    which fails without TensorFlow (not a ddjax dependency); then its SummaryWriter is replaced
    by a tensorboardX one before the import."""
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and not _importable("tensorflow"):
        shim = types.ModuleType(name, "clu SummaryWriter backed by tensorboardX (no TensorFlow).")
        shim.SummaryWriter = _summary_writer_shim
        sys.modules[name] = shim
    from clu import metric_writers, periodic_actions  # after the shim

    return metric_writers, periodic_actions


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def summaries_available() -> bool:
    """True when TensorBoard files can be written (tensorflow or tensorboardX importable)."""
    return _importable("tensorflow") or _importable("tensorboardX")


def create_writer(log_dir: str) -> Any:
    """clu's default writer to TensorBoard files in log_dir (log only on processes > 0)."""
    metric_writers, _ = import_clu()
    if not summaries_available():
        logging.warning("no TensorBoard backend (tensorflow or tensorboardX): metrics go to the log only")
    return metric_writers.create_default_writer(log_dir if summaries_available() else None,
                                                just_logging=jax.process_index() > 0)
