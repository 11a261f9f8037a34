"""The modes of `python -m ddjax.main` (config.mode), and the one list of them: `MODES`.

Each mode takes a `Run` (the config, its settings read once, the workdir) whose objects —
teacher, meshes, pairs, student, feature extractor — are built on first use and shared by
every stage of the run (`all` builds the teacher once for generate, train and evaluate).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddjax import sharding
from ddjax.app import build
from ddjax.app.settings import DD_FAMILIES, Settings, read_settings
from ddjax.dd2 import sampling as dd2_sampling
from ddjax.dd2 import train as dd2_train
from ddjax.demo import digits_t2i, digits_teacher, var_digits
from ddjax.evaluate import report as report_lib
from ddjax.evaluate.methods import FLOW_MAP, ONESTEP, TEACHER, build_methods, marginals
from ddjax.evaluate.report import eval_inputs, slug
from ddjax.mapper.generate import write_pairs
from ddjax.student import train as train_lib
from ddjax.student.loading import load_training_run
from ddjax.utils.batching import map_batches
from ddjax.utils.images import save_grid


@dataclasses.dataclass
class Run:
    """One job: the config, its settings and the objects built from them (each once)."""

    config: Any
    settings: Settings
    workdir: str

    @functools.cached_property
    def teacher(self):
        return build.build_teacher(self.config)

    @functools.cached_property
    def mesh(self):
        return build.make_mesh(self.config)

    @functools.cached_property
    def local_mesh(self):
        return build.make_mesh(self.config, local=True)

    @functools.cached_property
    def pairs(self):
        return build.open_pairs(self.config, self.workdir)

    @functools.cached_property
    def student(self):
        return build.student(self.config, self.workdir, self.teacher)

    @functools.cached_property
    def generator(self):
        """DD2's EMA generator (DD2Config, params) from WORKDIR/dd2/generator."""
        return dd2_train.load_generator(self.workdir)

    def check_stage_inputs(self) -> None:
        """Checks the settings against the teacher (step boundaries, sizes) before any stage."""
        t = self.teacher
        self.settings.dd.check(t)
        train_lib.check_train_settings(self.settings.train, t, sharding.batch_size_per_step(self.mesh))
        self.settings.data.check(sharding.batch_size_per_step(self.local_mesh))
        self.settings.eval.check()
        if self.settings.method == "dd2":
            self.settings.dd2.check(sharding.batch_size_per_step(self.mesh))
            if self.settings.dd2.teacher_from:
                t.check_timesteps((self.settings.dd2.teacher_from,), "config.dd2.teacher_from")


# -- modes --------------------------------------------------------------------------------------
def mode_info(run: Run) -> dict:
    t = run.teacher
    n = sum(x.size for x in jax.tree_util.tree_leaves(t.params))
    info = {"teacher": t.variant, "family": t.family, "parameters": int(n), "seq_len": t.seq_len,
            "vocab_size": t.vocab_size, "devices": [str(d) for d in jax.devices()]}
    logging.info("%s", info)
    return info


def mode_sample_teacher(run: Run) -> dict:
    """Samples config.sampling.num_images teacher images; writes tokens and a PNG grid."""
    s, t, mesh = run.settings, run.teacher, run.mesh
    bs, n = s.sample_batch_size, s.sample_num_images
    if bs % sharding.batch_size_per_step(mesh):
        raise ValueError(f"config.sampling.batch_size={bs} must be a multiple of the "
                         f"{sharding.batch_size_per_step(mesh)} batch shards")
    labels = build.class_labels(s.sample_labels, n, t.num_classes, run.config.seed)
    key = jax.random.PRNGKey(run.config.seed)
    placed = t.with_params(jax.device_put(t.params, sharding.replicated(mesh)))
    t0 = time.time()

    def fn(lab: np.ndarray, start: np.ndarray) -> jax.Array:
        return placed.sample(jnp.asarray(lab), jax.random.fold_in(key, int(start[0])), s.sampling,
                             mesh=mesh)

    def progress(done: int, total: int) -> None:
        logging.info("teacher samples %d/%d (%.2f images/s)", done, total, done / (time.time() - t0))

    starts = np.repeat(np.arange(0, n, bs), bs)[:n]
    tokens, _ = map_batches(fn, (labels, starts), bs, on_batch=progress)
    images = t.decode_ids(tokens)
    os.makedirs(run.workdir, exist_ok=True)
    np.savez(os.path.join(run.workdir, "teacher_samples.npz"), tokens=tokens, labels=labels)
    grid = save_grid(os.path.join(run.workdir, "teacher_samples.png"), images,
                     scale=max(1, 64 // images.shape[1]))
    logging.info("wrote %s", grid)
    return {"tokens": tokens, "labels": labels, "grid": grid}


def mode_generate(run: Run) -> dict:
    """Writes (noise, tokens, label) pair shards with the flow-matching map; resumable."""
    directory = build.pairs_dir(run.config, run.workdir)
    written = write_pairs(run.teacher, directory, run.settings.data, run.settings.sampling,
                          run.settings.flow, mesh=run.local_mesh)
    return {"dir": directory, "written": written}


def mode_train(run: Run) -> dict:
    return train_lib.train(run.teacher, run.pairs, run.settings.train, workdir=run.workdir,
                           mesh=run.mesh, seed=run.config.seed,
                           init_from_teacher=run.config.student.init_from_teacher,
                           image_loss=build.image_loss(run.settings.train, run.teacher))


def _description(run: Run) -> list[str]:
    c, s = run.config, run.settings
    return [f"Teacher `{run.teacher.variant}` ({run.teacher.checkpoint or 'random'}), "
            f"{s.eval.num_samples} samples per method on the same noise and class labels.",
            "Teacher sampling: " + ", ".join(f"{f.name} {getattr(s.sampling, f.name)}"
                                             for f in dataclasses.fields(s.sampling)) + "; DD t_list "
            f"{tuple(s.dd.t_list)}, split_t {s.dd.split_t}, teacher_start {s.dd.teacher_start}"
            + (f", teacher_split_t {s.dd.resolved_teacher_split_t}" if s.dd.teacher_involved else "")
            + f"; student `{c.student.checkpoint or run.workdir}`."]


def mode_train_dd2(run: Run) -> dict:
    """DD2's stages (adapt, tune, csd[, align]) in WORKDIR/dd2; resumable."""
    out = dd2_train.train(run.teacher, run.settings.dd2, run.settings.sampling, workdir=run.workdir,
                          mesh=run.mesh, seed=run.config.seed,
                          pairs=run.pairs if run.settings.dd2.warm_steps else None,
                          student=run.student if run.settings.dd2.generator == "student" else None)
    run.__dict__.pop("generator", None)
    return {k: v for k, v in out.items() if k not in ("final_state", "tuned", "adapted")}


def _methods(run: Run, with_baseline: bool = True) -> dict:
    # The report's onestep* baseline needs the pairs' tokens: without them evaluate stops.
    marg = marginals(run.pairs, run.teacher) if with_baseline else None
    out = build_methods(run.teacher, run.student, run.settings.dd, run.settings.sampling,
                        run.settings.flow, seed=run.settings.eval.seed, marg=marg)
    if run.settings.method == "dd2":
        out.update(dd2_sampling.methods(run.teacher, run.generator, run.settings.sampling,
                                        seed=run.settings.eval.seed,
                                        teacher_from=run.settings.dd2.teacher_from))
    return out


def mode_evaluate(run: Run) -> dict:
    """Samples every method on the same noise/labels, scores them, writes report.md + PNGs."""
    features = build.extractor(run.config)
    return report_lib.evaluate(run.teacher, _methods(run), run.settings.eval, features,
                               build.reference(run.config, run.teacher.image_size, features, run.workdir),
                               os.path.join(run.workdir, "report"), description=_description(run),
                               condition_classes=build.condition_classes(run.teacher))


def mode_sample(run: Run) -> dict:
    """DD samples (1-step, t_list, teacher-involved) as PNG grids + latents .npz."""
    s, t = run.settings, run.teacher
    n = s.dd.num_images
    noise, labels = eval_inputs(s.eval.seed, n, t.seq_len, t.code_dim, t.num_classes)
    if s.sample_labels:
        labels = build.class_labels(s.sample_labels, n, t.num_classes, run.config.seed)
    rows = np.arange(n)
    out = {}
    for name, m in _methods(run, with_baseline=False).items():
        if name in (TEACHER, FLOW_MAP, ONESTEP):
            continue
        latents, sec = map_batches(m.fn, (noise, labels, rows), min(s.dd.batch_size, n), warmup=True)
        images = t.decode_latents(latents)
        path = save_grid(os.path.join(run.workdir, f"samples_{slug(name)}.png"), images,
                         scale=max(1, 64 // images.shape[1]))
        np.savez(os.path.join(run.workdir, f"samples_{slug(name)}.npz"), latents=latents, labels=labels)
        logging.info("%s: %d images, %.2f ms/image -> %s", name, n, 1e3 * sec, path)
        out[name] = path
    return out


def mode_all(run: Run) -> dict:
    """generate -> train -> [train_dd2 ->] evaluate, skipping what is already done."""
    t0 = time.time()
    n = 4 if run.settings.method == "dd2" else 3
    logging.info("[1/%d] pairs", n)
    mode_generate(run)
    logging.info("[2/%d] student (%.0f s so far)", n, time.time() - t0)
    try:
        done = load_training_run(run.workdir)[2]["step"] >= run.settings.train.num_steps
    except (FileNotFoundError, ValueError):
        done = False
    if done:
        logging.info("student already trained to step %d: skipping", run.settings.train.num_steps)
    else:
        mode_train(run)
    if run.settings.method == "dd2":
        logging.info("[3/4] DD2 (%.0f s so far)", time.time() - t0)
        mode_train_dd2(run)
    logging.info("[%d/%d] evaluation and report (%.0f s so far)", n, n, time.time() - t0)
    result = mode_evaluate(run)
    logging.info("done in %.0f s: %s", time.time() - t0, result["report"])
    return result


# The digits demo teacher's own training (configs/digits.py), run through the same entry.
DEMO_MODES: dict[str, Callable[[Any, str], Any]] = {
    "train_vq": digits_teacher.train_vq, "train_teacher": digits_teacher.train_teacher,
    "evaluate_vq": digits_teacher.evaluate_vq, "evaluate_teacher": digits_teacher.evaluate_teacher,
    **digits_t2i.MODES,  # the embedded text-to-image teacher (train_t2i_teacher, evaluate_t2i_teacher)
    **var_digits.MODES,  # the embedded VAR teacher's (configs/var.py)
}
# demo mode -> the export that copies its workdir's weights and meta.json to config.export_dir
DEMO_EXPORTS: dict[str, Callable[[str, str], Any]] = {
    "train_teacher": digits_teacher.export_assets, "evaluate_teacher": digits_teacher.export_assets,
    "train_t2i_teacher": digits_t2i.export_assets, "evaluate_t2i_teacher": digits_t2i.export_assets,
    "train_var": var_digits.export_assets, "evaluate_var": var_digits.export_assets,
}

MODES: dict[str, Callable[[Run], Any]] = {
    "info": mode_info, "sample_teacher": mode_sample_teacher, "generate": mode_generate,
    "train": mode_train, "train_dd2": mode_train_dd2, "sample": mode_sample,
    "evaluate": mode_evaluate, "all": mode_all,
}
ALL_MODES = (*MODES, *DEMO_MODES)
TEACHER_MODES = ("info", "sample_teacher")  # every family; the others need the DD pipeline


def run(config: Any, workdir: str) -> Any:
    """Runs config.mode; each mode writes its outputs under workdir."""
    if config.mode not in ALL_MODES:
        raise ValueError(f"config.mode={config.mode!r} is not available; modes: {sorted(ALL_MODES)}")
    os.makedirs(workdir, exist_ok=True)
    if sharding.is_writer():
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(json.loads(config.to_json_best_effort()), f, indent=2)
    if config.mode in DEMO_MODES:
        out = DEMO_MODES[config.mode](config, workdir)
        if config.get("export_dir") and config.mode in DEMO_EXPORTS:
            logging.info("exported %s", DEMO_EXPORTS[config.mode](workdir, config.export_dir))
        return out
    job = Run(config, read_settings(config), workdir)
    if config.mode not in TEACHER_MODES:
        family = config.teacher.get("family", "llamagen")
        if family not in DD_FAMILIES:
            raise ValueError(f"config.mode={config.mode!r}: DD1 runs on {list(DD_FAMILIES)} teachers, "
                             f"not on config.teacher.family={family!r}; its modes are "
                             f"{sorted(TEACHER_MODES)} and the demo's {sorted(DEMO_MODES)}")
        job.check_stage_inputs()
    return MODES[config.mode](job)
