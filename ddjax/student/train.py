r"""Training the DD student on the noise -> token pairs (`--config.mode=train`, method.md §4–5).

  python -m ddjax.main --config=configs/llamagen.py:tiny --config.mode=generate --workdir=/tmp/dd
  python -m ddjax.main --config=configs/llamagen.py:tiny --config.mode=train --workdir=/tmp/dd

Each step draws, per pair, t from `train.t_list` (weights `train.t_weights`, rng folded from the
step), builds X_t = perturb(codebook[tokens], t, noise) with the pair's stored noise, and trains
both heads at positions ≥ t (ddjax/student/losses.py). The teacher only initialises the student
(`config.student.init_from_teacher`) and is never checkpointed.

Outputs under WORKDIR/student/:
  ddjax.json      {"kind": "dd", "model_config": {"gpt": GPTConfig, "codebook_dim": d}, ...}
  checkpoints/    Orbax CheckpointManager steps, items params / ema_params / opt_state / train
  logs/           TensorBoard summaries: clu's writer needs TensorFlow, which ddjax does not
                  depend on; without it tensorboardX writes them (`_import_clu`), and with
                  neither the metrics go to the log only
A run resumes from the latest checkpoint there, with the data order and rngs of an
uninterrupted run; `load_student(WORKDIR)` rebuilds (DDConfig, params) for a sampler.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics as clu_metrics
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddjax import run as run_lib
from ddjax import sharding as sharding_lib
from ddjax.mapper.pairs import PairDataset
from ddjax.student import losses, optim
from ddjax.student import model as model_lib
from ddjax.teacher.gpt import GPTConfig, as_dtype
from ddjax.utils.checkpoint import META_FILE, config_to_dict

STUDENT_DIR = "student"
CKPT_DIR = "checkpoints"
LOG_DIR = "logs"
ARRAY_ITEMS = ("params", "ema_params", "opt_state")
SHARDINGS = ("data", "fsdp")


# -- clu metric writers without TensorFlow ----------------------------------------------------
@functools.cache
def _tensorboardx_writer_class() -> type:
    import tensorboardX  # noqa: PLC0415
    from clu.metric_writers import interface  # noqa: PLC0415

    class TensorboardXWriter(interface.MetricWriter):
        """clu MetricWriter writing TensorBoard event files with tensorboardX (no TensorFlow)."""

        def __init__(self, logdir: str):
            self._writer = tensorboardX.SummaryWriter(logdir=logdir)

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
            self._writer.flush()

        def close(self):
            self._writer.close()

    return TensorboardXWriter


def _summary_writer_shim(logdir: str):
    """clu's `SummaryWriter(logdir)` when TensorFlow is absent: tensorboardX or an ImportError."""
    if not _importable("tensorboardX"):
        raise ImportError("TensorBoard summaries need tensorflow or tensorboardX installed")
    return _tensorboardx_writer_class()(logdir)


def _import_clu() -> tuple[Any, Any]:
    """(clu.metric_writers, clu.periodic_actions). Both import clu's TF summary writer module,
    which fails without TensorFlow (not a ddjax dependency); then its SummaryWriter is replaced
    by a tensorboardX one before the import."""
    name = "clu.metric_writers.summary_writer"
    if name not in sys.modules and not _importable("tensorflow"):
        shim = types.ModuleType(name, "clu SummaryWriter backed by tensorboardX (no TensorFlow).")
        shim.SummaryWriter = _summary_writer_shim
        sys.modules[name] = shim
    from clu import metric_writers, periodic_actions  # noqa: PLC0415

    return metric_writers, periodic_actions


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def summaries_available() -> bool:
    """True when TensorBoard files can be written (tensorflow or tensorboardX importable)."""
    return _importable("tensorflow") or _importable("tensorboardX")


# -- config -----------------------------------------------------------------------------------
def student_config(teacher: GPTConfig, codebook_dim: int, compute_dtype: Any = "float32"
                   ) -> model_lib.DDConfig:
    """The student's DDConfig: the teacher's sizes, compute in `compute_dtype`, f32 params."""
    return model_lib.dd_config(teacher, codebook_dim, dtype=as_dtype(compute_dtype),
                               param_dtype=jnp.float32)


def check_train_config(tc: Any, block_size: int, batch_shards: int = 1) -> None:
    """Raises a ValueError naming the first bad `config.train` field."""
    t_list, weights = tuple(tc.t_list), tuple(tc.t_weights)
    if not t_list or any(int(t) != t or not 0 <= t < block_size for t in t_list):
        raise ValueError(f"config.train.t_list={t_list}: need integers in [0, {block_size})")
    if len(set(t_list)) != len(t_list):
        raise ValueError(f"config.train.t_list={t_list} repeats a timestep")
    if len(weights) != len(t_list) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"config.train.t_weights={weights}: need {len(t_list)} non-negative "
                         "weights with a positive sum")
    if tc.sharding not in SHARDINGS:
        raise ValueError(f"config.train.sharding={tc.sharding!r}; choose one of {SHARDINGS}")
    if tc.batch_size <= 0 or tc.batch_size % batch_shards:
        raise ValueError(f"config.train.batch_size={tc.batch_size} must be a positive multiple of "
                         f"the {batch_shards} batch shards of the mesh")
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if tc[name] <= 0:
            raise ValueError(f"config.train.{name} must be positive, got {tc[name]}")
    as_dtype(tc.compute_dtype)
    losses.check_cont_loss(tc.cont_loss, tc.lpips_weights)


# -- sharding ---------------------------------------------------------------------------------
def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shards the largest dim divisible by `fsdp_size` over `fsdp` (the first on ties); 0/1-D
    leaves and leaves with no divisible dim are replicated."""
    if len(shape) < 2 or fsdp_size <= 1:
        return P()
    dims = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not dims:
        return P()
    best = max(dims, key=lambda i: (shape[i], -i))
    return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def state_shardings(abstract: Any, mesh: Any, mode: str) -> Any:
    """NamedShardings for a train-state tree: replicated ("data") or `fsdp_spec` per leaf."""
    fsdp = mesh.shape.get("fsdp", 1) if mode == "fsdp" else 1
    return jax.tree_util.tree_map(lambda a: NamedSharding(mesh, fsdp_spec(a.shape, fsdp)), abstract)


def batch_shardings(mesh: Any) -> dict[str, NamedSharding]:
    return {"noise": sharding_lib.batch_sharding(mesh, 3), "tokens": sharding_lib.batch_sharding(mesh, 2),
            "labels": sharding_lib.batch_sharding(mesh, 1)}


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """A global host batch -> device arrays split over the batch axes (each process its slice)."""
    return {k: sharding_lib.put_global(batch[k], sh) for k, sh in shardings.items()}


def make_init_fn(model_cfg: model_lib.DDConfig, tx: optax.GradientTransformation):
    """init(rng, teacher_params | None) -> state {step, params, ema_params, opt_state}."""

    def init(rng, teacher_params):
        params = model_lib.init_params(model_cfg, rng)
        if teacher_params is not None:
            params = model_lib.init_from_teacher(params, teacher_params)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "ema_params": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params)}

    return init


def make_train_step(model_cfg: model_lib.DDConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, tc: Any, codebook: Any, gather_params: Any = None):
    """The pure update: train_step(state, batch, rng) -> (state, metrics Collection).

    batch: noise [B, L, d] f32, tokens [B, L] int32, labels [B] int32. rng: the run's training
    key; the step's key is fold_in(rng, state["step"]), so the update is a function of
    (state, batch, rng) alone and a resumed run repeats an uninterrupted one.
    gather_params: with FSDP, a (replicated) sharding the forward pass constrains the params
    to: weights are all-gathered for the batch-parallel compute and their gradients
    reduce-scattered back to the shards (instead of XLA resharding activations).
    """
    model = model_lib.DDModel(model_cfg)
    codebook = jnp.asarray(codebook, jnp.float32)
    t_list = tuple(int(t) for t in tc.t_list)
    t_values = jnp.asarray(t_list, jnp.int32)
    log_w = jnp.log(jnp.asarray(tc.t_weights, jnp.float32))
    ce_w, cont_w, ema_decay = float(tc.ce_weight), float(tc.cont_weight), float(tc.ema_decay)
    ema_warmup = bool(tc.get("ema_warmup", True))

    def loss_fn(params, batch, t):
        if gather_params is not None:
            params = jax.lax.with_sharding_constraint(params, gather_params)
        tokens = batch["tokens"]
        x_t = model_lib.perturb(codebook[tokens], t, batch["noise"])
        cont, logits = model.apply({"params": params}, x_t, batch["labels"], t)
        terms = losses.per_position(cont, logits, tokens, codebook)
        mask = losses.target_mask(t, tokens.shape[1])
        loss, _ = losses.dd_loss(terms, mask, ce_weight=ce_w, cont_weight=cont_w)
        return loss, (terms, mask)

    def train_step(state, batch, rng):
        step = state["step"]
        key = jax.random.fold_in(rng, step)
        b = batch["tokens"].shape[0]
        t = t_values[jax.random.categorical(key, log_w, shape=(b,))]
        (loss, (terms, mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, t)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = optim.ema_update(state["ema_params"], params,
                               optim.ema_decay_at(step, ema_decay, ema_warmup))
        one = jnp.ones((), jnp.float32)
        avg = {k: clu_metrics.Average(total=s, count=c)
               for k, (s, c) in losses.sums_and_counts(terms, mask, t, t_list).items()}
        for k, v in (("loss", loss), ("l2_grads", optax.global_norm(grads)),
                     ("l2_params", optax.global_norm(params)), ("l2_updates", optax.global_norm(updates))):
            avg[k] = clu_metrics.Average(total=v.astype(jnp.float32), count=one)
        # A clu Collection: token-level Averages (merged exactly on the host) and the lr.
        metrics = clu_metrics.Collection.create_collection(
            **avg, lr=clu_metrics.LastValue(value=jnp.asarray(schedule(step), jnp.float32)))
        new_state = {"step": step + 1, "params": params, "ema_params": ema, "opt_state": opt_state}
        return new_state, metrics

    return train_step


def jit_train_step(step_fn, state_sh: Any, batch_sh: Any, mesh: Any):
    """jit with the state donated and the given shardings (metrics replicated)."""
    repl = sharding_lib.replicated(mesh)
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                   donate_argnums=(0,))


def compute_metrics(collection: Any) -> dict[str, float]:
    """Host floats of a merged metrics Collection; per-t averages with no tokens are left out."""
    host = jax.device_get(collection)
    out = {}
    for name in host.__dataclass_fields__:
        if name.startswith("_"):
            continue
        m = getattr(host, name)
        if isinstance(m, clu_metrics.Average) and float(m.count) == 0:
            continue
        out[name] = float(m.compute())
    return out


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save_state(mngr: ocp.CheckpointManager, state: Any, extra: dict | None = None) -> None:
    step = int(jax.device_get(state["step"]))
    items = {k: ocp.args.StandardSave(state[k]) for k in ARRAY_ITEMS}
    items["train"] = ocp.args.JsonSave({"step": step, **(extra or {})})
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract: Any, shardings: Any) -> Any:
    """The state saved at `step`, restored straight into `shardings`."""
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    items = {k: ocp.args.StandardRestore(target[k]) for k in ARRAY_ITEMS}
    got = mngr.restore(step, args=ocp.args.Composite(**items))
    state = {k: got[k] for k in ARRAY_ITEMS}
    state["step"] = jax.device_put(jnp.asarray(step, jnp.int32), shardings["step"])
    return state


def student_meta(model_cfg: model_lib.DDConfig, config: Any, data_dir: str) -> dict:
    return {"kind": "dd",
            "model_config": {"gpt": config_to_dict(model_cfg.gpt), "codebook_dim": model_cfg.codebook_dim},
            "checkpoints": CKPT_DIR, "items": list(ARRAY_ITEMS),
            "teacher": {"variant": config.teacher.variant, "checkpoint": config.teacher.checkpoint},
            "vq": {"variant": config.vq.variant, "checkpoint": config.vq.checkpoint},
            "pairs": os.path.abspath(data_dir),
            "train": json.loads(config.train.to_json_best_effort())}


def _write_meta(student_dir: str, meta: dict) -> None:
    path = os.path.join(student_dir, META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["model_config"]
        new = meta["model_config"]
        skip = {"dtype", "attention_impl"}  # compute settings may change between runs
        diff = sorted(k for k in set(old["gpt"]) | set(new["gpt"])
                      if k not in skip and old["gpt"].get(k) != new["gpt"].get(k))
        if diff or old.get("codebook_dim") != new["codebook_dim"]:
            raise ValueError(f"{student_dir} holds a student of another model (fields differ: "
                             f"{diff or ['codebook_dim']}); use a new workdir")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(path + ".tmp", path)


def model_config_from_meta(meta: dict) -> model_lib.DDConfig:
    mc = meta["model_config"]
    gpt = {k: (tuple(v) if isinstance(v, list) else v) for k, v in mc["gpt"].items()}
    return model_lib.DDConfig(GPTConfig(**gpt), int(mc["codebook_dim"]))


def load_student(path: str, step: int | None = None,
                 ema: bool = True) -> tuple[model_lib.DDConfig, Any, dict]:
    """(DDConfig, params, meta) from a training run: `path` is WORKDIR or WORKDIR/student; the
    EMA (default) or raw params of checkpoint `step` (default: the latest)."""
    student_dir = path if os.path.exists(os.path.join(path, META_FILE)) else os.path.join(path, STUDENT_DIR)
    with open(os.path.join(student_dir, META_FILE)) as f:
        meta = json.load(f)
    if meta.get("kind") != "dd":
        raise ValueError(f"{student_dir} holds a {meta.get('kind')!r} checkpoint, not a DD student")
    model_cfg = model_config_from_meta(meta)
    mngr = ocp.CheckpointManager(os.path.join(student_dir, meta.get("checkpoints", CKPT_DIR)),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{student_dir} has no training checkpoint yet")
    abstract = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg), jax.random.PRNGKey(0))
    item = "ema_params" if ema else "params"
    got = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
    mngr.close()
    return model_cfg, got[item], {**meta, "step": int(step)}


# -- the loop ---------------------------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """A training metric became NaN/inf; the bad state was not saved."""


def _first_non_finite(records: list[tuple[int, Any]]) -> tuple[int, str, float] | None:
    for step, values in records:
        for name in sorted(values, key=lambda n: n != "loss"):  # the loss first
            v = values[name]
            if not np.isfinite(v):
                return step, name, float(v)
    return None


def _open_dataset(config: Any, workdir: str) -> tuple[PairDataset, str]:
    data_dir = run_lib.pairs_dir(config, workdir)
    if not os.path.exists(os.path.join(data_dir, "dataset.json")):
        raise FileNotFoundError(f"no pair dataset in {data_dir}: run --config.mode=generate first "
                                "(or point --config.data.dir at one)")
    return PairDataset(data_dir), data_dir


def train(config: Any, workdir: str) -> dict:
    """Trains (or resumes training of) the student; returns final metrics and paths.

    Returns {"step", "start_step", "metrics" (the last logged), "history" [(step, metrics)],
    "losses" {step: loss of that update} for the steps run by this call, "student_dir",
    "checkpoint_dir", "log_dir", "latest_checkpoint"}. Raises NonFiniteError (naming the step
    and metric) when a metric turns NaN/inf; the checkpoints then end at the last good one.
    """
    tc = config.train
    teacher_cfg = run_lib.teacher_config(config)
    mesh = run_lib.make_mesh(config)
    check_train_config(tc, teacher_cfg.block_size, sharding_lib.batch_size_per_step(mesh))
    dataset, data_dir = _open_dataset(config, workdir)
    vq_cfg, vq_params = run_lib.load_vq(config)
    codebook = run_lib.vq_codebook(vq_params, vq_cfg)
    del vq_params
    spec = dataset.spec
    want = {"seq_len": teacher_cfg.block_size, "noise_dim": codebook.shape[1],
            "num_classes": teacher_cfg.num_classes}
    bad = {k: (getattr(spec, k), v) for k, v in want.items() if getattr(spec, k) != v}
    if spec.generator.get("vocab_size", teacher_cfg.vocab_size) != teacher_cfg.vocab_size:
        bad["vocab_size"] = (spec.generator["vocab_size"], teacher_cfg.vocab_size)
    if bad:
        raise ValueError(f"pairs in {data_dir} do not fit this model ((dataset, model): {bad})")

    model_cfg = student_config(teacher_cfg, codebook.shape[1], tc.compute_dtype)
    tx, schedule = optim.make_optimizer(tc)
    init_fn = make_init_fn(model_cfg, tx)
    root = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    abstract = jax.eval_shape(init_fn, init_rng, None)
    state_sh = state_shardings(abstract, mesh, tc.sharding)
    batch_sh = batch_shardings(mesh)

    student_dir = os.path.join(workdir, STUDENT_DIR)
    ckpt_dir, log_dir = os.path.join(student_dir, CKPT_DIR), os.path.join(student_dir, LOG_DIR)
    os.makedirs(student_dir, exist_ok=True)
    _write_meta(student_dir, student_meta(model_cfg, config, data_dir))
    mngr = checkpoint_manager(ckpt_dir, tc.keep_checkpoints)
    start = mngr.latest_step()
    if start is not None:
        logging.info("resuming from %s step %d", ckpt_dir, start)
        state = restore_state(mngr, start, abstract, state_sh)
    else:
        start, teacher, kw = 0, None, {}
        if config.student.init_from_teacher:
            _, teacher = run_lib.load_teacher(config)  # used here once, never saved
            # The teacher goes in sharded like the student's state (replicated with "data").
            kw["in_shardings"] = (sharding_lib.replicated(mesh),
                                  state_shardings(teacher, mesh, tc.sharding))
        state = jax.jit(init_fn, out_shardings=state_sh, **kw)(init_rng, teacher)
        del teacher
    n_params = model_lib.param_count(abstract["params"])
    logging.info("student: %d parameters, %s sharding over %s, compute %s", n_params, tc.sharding,
                 dict(mesh.shape), tc.compute_dtype)

    gather = sharding_lib.replicated(mesh) if tc.sharding == "fsdp" else None
    step_fn = jit_train_step(make_train_step(model_cfg, tx, schedule, tc, codebook, gather),
                             state_sh, batch_sh, mesh)
    metric_writers, periodic_actions = _import_clu()
    if not summaries_available():
        logging.warning("no TensorBoard backend (tensorflow or tensorboardX): metrics go to the log only")
    writer = metric_writers.create_default_writer(log_dir if summaries_available() else None,
                                                  just_logging=jax.process_index() > 0)
    if start == 0:
        writer.write_hparams({k: v for k, v in tc.items() if isinstance(v, (int, float, str, bool))})
    report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                             every_steps=tc.log_every, every_secs=None)
    batches = dataset.batches(tc.batch_size, seed=config.seed, start_step=start,
                              window=tc.shuffle_window)
    result = {"start_step": start, "step": start, "metrics": {}, "history": [], "losses": {},
              "student_dir": student_dir, "checkpoint_dir": ckpt_dir, "log_dir": log_dir,
              "num_params": n_params}
    acc, pending = None, []
    last_t, last_step = time.time(), start

    def check_finite():
        records = jax.device_get(pending)
        pending.clear()
        for s, v in records:
            result["losses"][s] = float(v["loss"])
        bad = _first_non_finite(records)
        if bad is not None:
            s, name, v = bad
            raise NonFiniteError(
                f"training stopped: {name} = {v} at step {s}; this state was not saved, the latest "
                f"checkpoint stays step {mngr.latest_step()} (lower config.train.lr or check the data)")

    try:
        for step in range(start, tc.num_steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = put_batch(next(batches), batch_sh)
                state, m = step_fn(state, batch, step_rng)
            done = step + 1
            acc = m if acc is None else acc.merge(m)
            pending.append((done, {"loss": m.loss.total, "l2_grads": m.l2_grads.total}))
            report(done)
            is_log, is_ckpt = done % tc.log_every == 0, done % tc.checkpoint_every == 0
            if is_log or is_ckpt or done == tc.num_steps:
                check_finite()
            if is_log or done == tc.num_steps:
                values = compute_metrics(acc)
                bad = _first_non_finite([(done, values)])
                if bad is not None:
                    raise NonFiniteError(f"training stopped: {bad[1]} = {bad[2]} in the steps up to "
                                         f"{done}; the latest checkpoint stays step {mngr.latest_step()}")
                now = time.time()
                values["examples_per_sec"] = (done - last_step) * tc.batch_size / max(now - last_t, 1e-9)
                last_t, last_step, acc = now, done, None
                writer.write_scalars(done, values)
                result["history"].append((done, values))
                result["metrics"] = values
            if is_ckpt or done == tc.num_steps:
                with report.timed("checkpoint"):
                    save_state(mngr, state, {"examples_seen": done * tc.batch_size})
            result["step"] = done
    finally:
        writer.close()  # flushes
        mngr.wait_until_finished()
        result["latest_checkpoint"] = mngr.latest_step()
        mngr.close()
    if start >= tc.num_steps:
        logging.info("already trained: checkpoint step %d >= num_steps %d", start, tc.num_steps)
    return result
