r"""Training the DD student on the noise -> token pairs (`--config.mode=train`, method.md §4–5).

    result = train(teacher, PairDataset(pairs_dir), TrainSettings(...), workdir=WORKDIR, mesh=mesh)

Each step draws, per pair, t from `train.t_list` (weights `train.t_weights`, rng folded from the
step), builds X_t = perturb(codebook[tokens], t, noise) with the pair's stored noise, and trains
both heads at positions ≥ t (ddjax/student/losses.py). The teacher only initialises the student
(`init_from_teacher`) and is never checkpointed.

Outputs under WORKDIR/student/:
  ddjax.json      {"kind": "dd", "model_config": {"gpt": GPTConfig, "codebook_dim": d}, ...}
  checkpoints/    Orbax CheckpointManager steps, items params / ema_params / opt_state / train
  logs/           TensorBoard summaries (`ddjax.utils.metrics`)
A run resumes from the latest checkpoint there, with the data order and rngs of an
uninterrupted run; `load_student(WORKDIR)` rebuilds (DDConfig, params) for a sampler.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
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

from ddjax import sharding as sharding_lib
from ddjax.mapper.pairs import PairDataset
from ddjax.student import losses
from ddjax.student import model as model_lib
from ddjax.student.families import family_of_config, student_family
from ddjax.student.loading import CKPT_DIR, STUDENT_DIR
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen.captions import Captions
from ddjax.teacher.llamagen.gpt import GPTConfig, as_dtype
from ddjax.utils import optim
from ddjax.utils.checkpoint import META_FILE
from ddjax.utils.metrics import create_writer, import_clu

LOG_DIR = "logs"
ARRAY_ITEMS = ("params", "ema_params", "opt_state")
SHARDINGS = ("data", "fsdp")
# (its frozen weights, continuous tokens [B, L, d], target codes [B, L, d]) -> per-image loss [B]
ImageLoss = Callable[[Any, jax.Array, jax.Array], jax.Array]


# -- config -----------------------------------------------------------------------------------
def student_config(teacher: GPTConfig, codebook_dim: int, compute_dtype: Any = "float32"
                   ) -> model_lib.DDConfig:
    """The student's DDConfig: the teacher's sizes, compute in `compute_dtype`, f32 params."""
    return model_lib.dd_config(teacher, codebook_dim, dtype=as_dtype(compute_dtype),
                               param_dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything the trainer reads (config.train holds the same fields)."""

    t_list: tuple[int, ...] = (0, 80)  # timesteps t the student is trained at
    t_weights: tuple[float, ...] = (1.0, 1.0)  # sampling weights of t_list
    batch_size: int = 32  # global
    num_steps: int = 10_000
    lr: float = 1e-4
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at update n
    ce_weight: float = 1.0  # cross-entropy on the logits head
    cont_weight: float = 1.0  # continuous head loss
    cont_loss: str = "mse"  # "mse" to the target codes, or "lpips" on VQ-decoded images
    lpips_weights: str = ""  # torchvision VGG16 weights for cont_loss="lpips"
    lpips_lin_weights: str = ""  # LPIPS linear layers ("" = the installed lpips package's)
    compute_dtype: str = "float32"  # or "bfloat16"
    sharding: str = "data"  # "data" (replicated params) or "fsdp"
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    shuffle_window: int = 16  # shards shuffled together

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_train_settings(tc: TrainSettings, teacher: Teacher, batch_shards: int = 1) -> None:
    """Raises a ValueError naming the first bad `config.train` field."""
    t_list, weights = tuple(tc.t_list), tuple(tc.t_weights)
    if not t_list:
        raise ValueError("config.train.t_list is empty")
    teacher.check_timesteps(t_list, "config.train.t_list")
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
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "shuffle_window"):
        if getattr(tc, name) <= 0:
            raise ValueError(f"config.train.{name} must be positive, got {getattr(tc, name)}")
    if tc.lr <= 0 or tc.warmup_steps < 0:
        raise ValueError(f"config.train.lr={tc.lr} must be > 0 and warmup_steps={tc.warmup_steps} >= 0")
    try:
        as_dtype(tc.compute_dtype)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"config.train.compute_dtype={tc.compute_dtype!r}: {e}") from e
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


def batch_shardings(mesh: Any, captions: bool = False) -> dict[str, NamedSharding]:
    """captions: a t2i teacher's batches also carry the looked-up caption features [B, N, C]
    and masks [B, N] (`caption_arrays`)."""
    out = {"noise": sharding_lib.batch_sharding(mesh, 3), "tokens": sharding_lib.batch_sharding(mesh, 2),
           "labels": sharding_lib.batch_sharding(mesh, 1)}
    if captions:
        out.update(caption_features=sharding_lib.batch_sharding(mesh, 3),
                   caption_mask=sharding_lib.batch_sharding(mesh, 2))
    return out


def caption_arrays(teacher: Teacher, labels: np.ndarray) -> dict[str, np.ndarray]:
    """A t2i teacher's caption ids [B] -> {"caption_features", "caption_mask"} (host lookup)."""
    caps = teacher.resolve_cond(np.asarray(labels))
    return {"caption_features": np.asarray(caps.features, np.float32),
            "caption_mask": np.asarray(caps.mask, bool)}


def batch_cond(batch: dict[str, Any]) -> Any:
    """The student's condition of a batch: Captions when it carries them, else the labels."""
    if "caption_features" in batch:
        return Captions(batch["caption_features"], batch["caption_mask"])
    return batch["labels"]


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """A global host batch -> device arrays split over the batch axes (each process its slice)."""
    return {k: sharding_lib.put_global(batch[k], sh) for k, sh in shardings.items()}


def make_init_fn(model_cfg: Any, tx: optax.GradientTransformation):
    """init(rng, teacher_params | None) -> state {step, params, ema_params, opt_state}; any
    family's model config (DDConfig, VARDDConfig)."""
    fam = family_of_config(model_cfg)

    def init(rng, teacher_params):
        params = fam.init_params(model_cfg, rng)
        if teacher_params is not None:
            params = fam.init_from_teacher(params, teacher_params, jax.random.fold_in(rng, 1))
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "ema_params": jax.tree_util.tree_map(jnp.copy, params), "opt_state": tx.init(params)}

    return init


def make_train_step(model_cfg: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, tc: TrainSettings, codebook: Any,
                    gather_params: Any = None, image_loss: ImageLoss | None = None):
    """The pure update: train_step(state, batch, rng, loss_weights) -> (state, metrics Collection).

    batch: noise [B, L, d] f32, tokens [B, L] int32, labels [B] int32 (and, for a t2i teacher,
    caption_features [B, N, C] / caption_mask [B, N]: `caption_arrays`). rng: the run's training
    key; the step's key is fold_in(rng, state["step"]), so the update is a function of
    (state, batch, rng) alone and a resumed run repeats an uninterrupted one.
    gather_params: with FSDP, a (replicated) sharding the forward pass constrains the params
    to: weights are all-gathered for the batch-parallel compute and their gradients
    reduce-scattered back to the shards (instead of XLA resharding activations).
    image_loss: with cont_loss="lpips", (loss_weights, continuous [B, L, d], target codes
    [B, L, d]) -> [B] (a perceptual distance of the decoded images); the continuous head is
    scored by it, with the positions before t passed through from X_t as at sampling time.
    loss_weights (the LPIPS network and the decoder, frozen) is the step's last argument
    (None without an image loss), so the weights are not constants of the compiled step.
    """
    model = family_of_config(model_cfg).module(model_cfg)
    codebook = jnp.asarray(codebook, jnp.float32)
    t_list = tuple(int(t) for t in tc.t_list)
    t_values = jnp.asarray(t_list, jnp.int32)
    log_w = jnp.log(jnp.asarray(tc.t_weights, jnp.float32))
    ce_w, cont_w, ema_decay = float(tc.ce_weight), float(tc.cont_weight), float(tc.ema_decay)
    ema_warmup = bool(tc.ema_warmup)
    if tc.cont_loss == "lpips" and image_loss is None:
        raise ValueError("config.train.cont_loss='lpips' needs an image loss (the LPIPS network)")

    def loss_fn(params, batch, t, loss_weights):
        if gather_params is not None:
            params = jax.lax.with_sharding_constraint(params, gather_params)
        tokens = batch["tokens"]
        x_t = model_lib.perturb(codebook[tokens], t, batch["noise"])
        cont, logits = model.apply({"params": params}, x_t, batch_cond(batch), t)
        terms = losses.per_position(cont, logits, tokens, codebook)
        mask = losses.target_mask(t, tokens.shape[1])
        if tc.cont_loss == "lpips":
            mixed = jnp.where(mask[..., None], cont.astype(jnp.float32), x_t)
            terms = {**terms, "image": image_loss(loss_weights, mixed, codebook[tokens])}
        loss, _ = losses.dd_loss(terms, mask, ce_weight=ce_w, cont_weight=cont_w,
                                 cont_loss=tc.cont_loss)
        return loss, (terms, mask)

    def train_step(state, batch, rng, loss_weights=None):
        step = state["step"]
        key = jax.random.fold_in(rng, step)
        b = batch["tokens"].shape[0]
        t = t_values[jax.random.categorical(key, log_w, shape=(b,))]
        (loss, (terms, mask)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, t, loss_weights)
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
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, repl, repl),
                   out_shardings=(state_sh, repl), donate_argnums=(0,))


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
    """Keep-N Orbax manager; saves are asynchronous in a single-process run only.

    Orbax's save barrier is a device collective (`sync_global_devices`). Run from its background
    thread while the main thread's train step runs its own cross-process collectives, the two
    can interleave differently on two processes and deadlock (seen with 2 CPU processes over
    Gloo: both hung in the step after a checkpoint). With several processes the save therefore
    runs in the main thread, between steps.
    """
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=jax.process_count() == 1)
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


def student_meta(model_cfg: Any, teacher: Teacher, tc: TrainSettings, data_dir: str) -> dict:
    fam = family_of_config(model_cfg)
    return {"kind": "dd", "family": fam.name, "model_config": fam.to_json(model_cfg),
            "checkpoints": CKPT_DIR, "items": list(ARRAY_ITEMS),
            "teacher": {"family": teacher.family, "variant": teacher.variant,
                        "checkpoint": teacher.checkpoint},
            "pairs": os.path.abspath(data_dir),
            "train": tc.to_json()}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_meta(student_dir: str, meta: dict) -> None:
    path = os.path.join(student_dir, META_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)["model_config"]
        new = meta["model_config"]
        skip = {"dtype", "attention_impl"}  # compute settings may change between runs
        flat_old, flat_new = _flatten(old), _flatten(new)
        diff = sorted(k for k in set(flat_old) | set(flat_new)
                      if k.rpartition(".")[2] not in skip and flat_old.get(k) != flat_new.get(k))
        if diff:
            raise ValueError(f"{student_dir} holds a student of another model (fields differ: "
                             f"{diff}); use a new workdir")
    if jax.process_index() == 0:
        with open(path + ".tmp", "w") as f:
            json.dump(meta, f, indent=2)
        os.replace(path + ".tmp", path)


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


def check_dataset(dataset: PairDataset, teacher: Teacher) -> None:
    """Raises a ValueError unless the pairs were written for this teacher's shapes."""
    spec = dataset.spec
    want = {"seq_len": teacher.seq_len, "noise_dim": teacher.code_dim,
            "num_classes": teacher.num_classes}
    bad = {k: (getattr(spec, k), v) for k, v in want.items() if getattr(spec, k) != v}
    if spec.generator.get("vocab_size", teacher.vocab_size) != teacher.vocab_size:
        bad["vocab_size"] = (spec.generator["vocab_size"], teacher.vocab_size)
    if bad:
        raise ValueError(f"pairs in {dataset.directory} do not fit this teacher ((dataset, teacher): {bad})")


def train(teacher: Teacher, dataset: PairDataset, tc: TrainSettings, *, workdir: str, mesh: Any,
          seed: int = 0, init_from_teacher: bool = True,
          image_loss: tuple[ImageLoss, Any] | None = None) -> dict:
    """Trains (or resumes training of) the student in WORKDIR/student on `dataset`.

    The student has the teacher's sizes; `init_from_teacher` copies the teacher's weights into
    a fresh run. image_loss: (loss, its frozen weights) for cont_loss="lpips" (see
    make_train_step).

    Returns {"step", "start_step", "metrics" (the last logged), "history" [(step, metrics)],
    "losses" {step: loss of that update} for the steps run by this call, "student_dir",
    "checkpoint_dir", "log_dir", "latest_checkpoint"}. Raises NonFiniteError (naming the step
    and metric) when a metric turns NaN/inf; the checkpoints then end at the last good one.
    """
    check_train_settings(tc, teacher, sharding_lib.batch_size_per_step(mesh))
    check_dataset(dataset, teacher)
    data_dir = dataset.directory
    codebook = teacher.codebook

    model_cfg = student_family(teacher.family).config_for(teacher, tc.compute_dtype)
    tx, schedule = optim.make_optimizer(tc)
    init_fn = make_init_fn(model_cfg, tx)
    root = jax.random.PRNGKey(seed)
    init_rng, step_rng = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
    abstract = jax.eval_shape(init_fn, init_rng, None)
    state_sh = state_shardings(abstract, mesh, tc.sharding)
    with_captions = teacher.caption_conditioned
    batch_sh = batch_shardings(mesh, captions=with_captions)

    student_dir = os.path.join(workdir, STUDENT_DIR)
    ckpt_dir, log_dir = os.path.join(student_dir, CKPT_DIR), os.path.join(student_dir, LOG_DIR)
    os.makedirs(student_dir, exist_ok=True)
    _write_meta(student_dir, student_meta(model_cfg, teacher, tc, data_dir))
    mngr = checkpoint_manager(ckpt_dir, tc.keep_checkpoints)
    start = mngr.latest_step()
    if start is not None:
        logging.info("resuming from %s step %d", ckpt_dir, start)
        state = restore_state(mngr, start, abstract, state_sh)
    else:
        start, kw = 0, {}
        weights = teacher.params if init_from_teacher else None
        if weights is not None:
            # The teacher goes in sharded like the student's state (replicated with "data").
            kw["in_shardings"] = (sharding_lib.replicated(mesh),
                                  state_shardings(weights, mesh, tc.sharding))
        state = jax.jit(init_fn, out_shardings=state_sh, **kw)(init_rng, weights)
    state = sharding_lib.settle(state)
    n_params = model_lib.param_count(abstract["params"])
    logging.info("student: %d parameters, %s sharding over %s, compute %s", n_params, tc.sharding,
                 dict(mesh.shape), tc.compute_dtype)

    gather = sharding_lib.replicated(mesh) if tc.sharding == "fsdp" else None
    loss_fn, loss_weights = image_loss if image_loss is not None else (None, None)
    step_fn = jit_train_step(make_train_step(model_cfg, tx, schedule, tc, codebook, gather, loss_fn),
                             state_sh, batch_sh, mesh)
    if loss_weights is not None:
        loss_weights = jax.device_put(loss_weights, sharding_lib.replicated(mesh))
    _, periodic_actions = import_clu()
    writer = create_writer(log_dir)
    if start == 0:
        writer.write_hparams({k: v for k, v in tc.to_json().items()
                              if isinstance(v, (int, float, str, bool))})
    report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                             every_steps=tc.log_every, every_secs=None)
    batches = dataset.batches(tc.batch_size, seed=seed, start_step=start,
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
                host = next(batches)
                if with_captions:
                    host = {**host, **caption_arrays(teacher, host["labels"])}
                batch = put_batch(host, batch_sh)
                state, m = sharding_lib.settle(step_fn(state, batch, step_rng, loss_weights))
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
                    writer.flush()  # a killed run's logs then reach its last checkpoint
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
