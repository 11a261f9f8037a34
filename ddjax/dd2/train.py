r"""DD2's training pipeline (dd2.md §4–5): resumable stages under WORKDIR/dd2/.

    result = train(teacher, DD2Settings(...), sampling_settings, workdir=WORKDIR, mesh=mesh)

  samples   teacher token sequences (ancestral sampling, the run's sampling settings) for the
            stages that need data: `samples.npz`;
  adapt     continuous-input adaptation (LlamaGen, dd2.md §4): the token table is put behind
            `CodebookEmbed` (exact at the codes, smooth between them), then the whole adapted
            teacher is fine-tuned with the AR cross-entropy on the samples (`adapt_steps`);
            the result is DD2's teacher. VAR reads continuous tokens through its own input
            map (`ddjax.dd2.var_model`), so on VAR the teacher is DD2's teacher and there is
            no adapt stage (adapt_steps must be 0);
  tune      AR-diffusion tuning with the ground-truth-score (GTS) loss: a score network (the
            adapted teacher's backbone with an MLP head) regresses the adapted teacher's
            closed-form velocity at R noise draws per sequence; it initialises both networks;
  warm      optional (`warm_steps` > 0, not in the paper): the generator regresses DD1's
            noise->token pairs (squared error). With `generator="student"` the generator is
            DD1's student instead (`ddjax.dd2.student_generator`; not in the paper) and
            there is no warm stage;
  guide_warm  optional (`guide_warm_steps` > 0): guidance-only updates on the starting
            generator, so CSD starts from a guidance that knows the generator's distribution;
            the guidance network is the tuned network (guidance "score", the paper's), or with
            guidance "ar" (generator "student", whose outputs lie on the codes) the adapted
            teacher's network trained by AR cross-entropy on the generated codes: the fake
            score then has the teacher score's closed form;
  csd       the main stage: per iteration `csd.guide_steps` guidance updates (FCS: denoising
            score matching on generated sequences, velocity form) then one generator update
            with the CSD loss (SiD, alpha; the prefix stop-gradient); the generator's EMA
            decays min(ema_decay, (i + 1) / (i + 10));
  align     optional performance alignment (`align.steps` > 0): the generator is replaced by
            its EMA and frozen while the guidance network trains alone, then `align.csd_steps`
            more CSD iterations run.

Each stage (`ddjax.dd2.stages.run_stage`) keeps Orbax checkpoints in dd2/<stage>/checkpoints
and TensorBoard logs in dd2/<stage>/logs; a rerun restores a finished stage's last state
instead of recomputing it, and resumes an interrupted one from its latest checkpoint with
the rngs of an uninterrupted run (every step's randomness is fold_in(stage key, step)). The
EMA generator is written to dd2/generator (`load_generator`), the adapted teacher to
dd2/teacher (`load_adapted_teacher`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddjax import sharding as sharding_lib
from ddjax.dd2 import functional as F
from ddjax.dd2 import losses, student_generator, var_model
from ddjax.dd2 import model as model_lib
from ddjax.dd2.settings import (
    DD2Settings,
    OptSettings,
    config_from_json,
    config_to_json,
    model_config,
    settings_from_dict,
)
from ddjax.dd2.stages import latest_step, run_stage
from ddjax.student.model import nearest_code
from ddjax.teacher.base import Teacher
from ddjax.teacher.llamagen.sampling import SamplingSettings
from ddjax.utils import optim
from ddjax.utils.checkpoint import load_params, save_params

DD2_DIR = "dd2"
GENERATOR_DIR = "generator"
TEACHER_DIR = "teacher"
SAMPLES_FILE = "samples.npz"
STAGES = ("adapt", "tune", "warm", "guide_warm", "csd", "align", "csd_after")


# -- stage 0: teacher samples -----------------------------------------------------------------
def teacher_samples(teacher: Teacher, s: DD2Settings, settings: SamplingSettings, directory: str,
                    *, seed: int, mesh: Any) -> dict[str, np.ndarray]:
    """N teacher sequences {"ids" [N, L] int32, "labels" [N] int32}, written once (atomically)."""
    path = os.path.join(directory, SAMPLES_FILE)
    if os.path.exists(path):
        with np.load(path) as f:
            got = {k: f[k] for k in ("ids", "labels")}
        if got["ids"].shape == (s.num_samples, teacher.seq_len):
            return got
        raise ValueError(f"{path} holds {got['ids'].shape} samples, config.dd2.num_samples="
                         f"{s.num_samples} and L={teacher.seq_len} want {(s.num_samples, teacher.seq_len)}; "
                         "use a new workdir or delete it")
    bs = s.sample_batch_size
    n_cls = max(teacher.num_classes, 1)
    labels = (np.arange(s.num_samples) % n_cls).astype(np.int32)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 7)
    placed = teacher.with_params(jax.device_put(teacher.params, sharding_lib.replicated(mesh)))
    ids, t0 = [], time.time()
    for start in range(0, s.num_samples, bs):
        lab = labels[start:start + bs]
        pad = np.pad(lab, (0, bs - len(lab)))
        out = placed.sample(jnp.asarray(pad), jax.random.fold_in(key, start), settings, mesh=mesh)
        ids.append(sharding_lib.to_host(out)[: len(lab)])
        logging.info("dd2 teacher samples %d/%d (%.1f/s)", start + len(lab), s.num_samples,
                     (start + len(lab)) / (time.time() - t0))
    got = {"ids": np.concatenate(ids).astype(np.int32), "labels": labels}
    if sharding_lib.is_writer():
        os.makedirs(directory, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **got)
        os.replace(tmp, path)
    return got


def sample_batch(data: dict[str, np.ndarray], size: int, seed: int, stage: int):
    """batch(i): `size` rows drawn with replacement by (seed, stage, i): a function of i alone."""
    n = len(data["ids"])

    def batch(i: int) -> dict[str, np.ndarray]:
        rows = np.random.default_rng((seed, stage, i)).integers(0, n, size)
        return {"ids": data["ids"][rows], "labels": data["labels"][rows]}

    return batch


# -- stage 1: continuous-input adaptation ------------------------------------------------------
def embedding_error(params: Any, cfg: model_lib.DD2Config, table: jax.Array, codebook: jax.Array
                    ) -> float:
    """|embed(C) - E| / |E| over the codebook: how far the continuous embedding is from the
    teacher's token table at the codes."""
    model = model_lib.DD2Transformer(cfg, "teacher")
    pred = model.apply({"params": params}, codebook, method=model_lib.DD2Transformer.embed)
    return float(jnp.sqrt(jnp.sum(jnp.square(pred - table)) / jnp.sum(table * table)))


def adapt_step(cfg: model_lib.DD2Config, tx: optax.GradientTransformation):
    """AR cross-entropy on teacher samples fed as codes, with the teacher's class dropout (so
    the null class, and with it CFG, stays trained)."""
    p_drop = float(cfg.gpt.class_dropout_prob)

    def step(state, batch, rng, codebook, aux):
        del aux  # LlamaGen only: VAR has no adaptation stage
        key = jax.random.fold_in(rng, state["step"])
        ids, labels = batch["ids"], batch["labels"]
        drop = jax.random.uniform(key, labels.shape) < p_drop if p_drop > 0 else None

        def loss_fn(p):
            logits = F.teacher_logits(p, cfg, codebook[ids], labels, drop)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        u, opt = tx.update(g, state["opt"], state["params"])
        return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], u), "opt": opt},
                {"ce": loss, "l2_grads": optax.global_norm(g)})

    return step


# -- stage 2: AR-diffusion tuning (GTS) ---------------------------------------------------------
def draw_noised(key: jax.Array, q: jax.Array, draws: int, t_min: float):
    """R draws of (eps, t, x_t) per sequence: [B, R, L, d], [B, R, L], [B, R, L, d]."""
    b, n, d = q.shape
    k1, k2 = jax.random.split(key)
    eps = jax.random.normal(k1, (b, draws, n, d), jnp.float32)
    t = jax.random.uniform(k2, (b, draws, n), jnp.float32, t_min, 1.0)
    x = (1.0 - t[..., None]) * q[:, None] + t[..., None] * eps
    return eps, t, x


def gts_loss(params, cfg, teacher_params, q, labels, key, codebook, settings, s: DD2Settings,
             aux=None):
    """|v(x_t, t | q_<i) - (x_t - m_T) / t|^2, m_T the adapted teacher's posterior mean."""
    log_p = jax.lax.stop_gradient(F.teacher_log_probs(teacher_params, cfg, q, labels, settings, aux))
    _, t, x = draw_noised(key, q, s.noise_draws, s.t_min)
    target = (x - F.mixture_mean(x, t, log_p, codebook)) / t[..., None]
    return losses.velocity_loss(F.velocity(params, cfg, q, labels, x, t, aux), target)


def tune_step(cfg, tx, settings: SamplingSettings, s: DD2Settings, head_only_until: int):
    def step(state, batch, rng, teacher_params, codebook, aux):
        key = jax.random.fold_in(rng, state["step"])
        q = codebook[batch["ids"]]
        loss, g = jax.value_and_grad(gts_loss)(state["params"], cfg, teacher_params, q, batch["labels"],
                                               key, codebook, settings, s, aux)
        if head_only_until > 0:
            keep = state["step"] >= head_only_until
            head = F.score_head_name(cfg)
            g = {k: (v if k == head else jax.tree_util.tree_map(lambda x: jnp.where(keep, x, 0.0), v))
                 for k, v in g.items()}
        u, opt = tx.update(g, state["opt"], state["params"])
        return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], u), "opt": opt},
                {"gts": loss, "l2_grads": optax.global_norm(g)})

    return step


# -- optional: the generator's warm start on DD1's pairs ---------------------------------------
class PairBatches:
    """batch(i) over a PairDataset's resumable order (i must not go backwards)."""

    def __init__(self, dataset: Any, size: int, seed: int):
        self.dataset, self.size, self.seed = dataset, size, seed
        self.it, self.last = None, (None, None)

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        if self.last[0] == i:
            return self.last[1]
        if self.it is None:
            self.it = self.dataset.batches(self.size, seed=self.seed, start_step=i)
        b = next(self.it)
        out = {"noise": np.asarray(b["noise"], np.float32), "tokens": np.asarray(b["tokens"], np.int32),
               "labels": np.asarray(b["labels"], np.int32)}
        self.last = (i, out)
        return out


def warm_step(cfg, tx, loss_kind: str = "mse", tau: float = 1.0):
    """On (noise, tokens) pairs of the flow map: |G(noise) - codebook[tokens]|^2, or with
    loss_kind="code_ce" the nearest-code cross-entropy at tau (`code_ce`)."""

    def step(state, batch, rng, codebook, aux):
        del rng

        def loss_fn(p):
            q = F.generate(p, cfg, batch["noise"], batch["labels"], aux)
            if loss_kind == "code_ce":
                return losses.code_ce(q, batch["tokens"], codebook, tau)
            return losses.velocity_loss(q, codebook[batch["tokens"]])

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        u, opt = tx.update(g, state["opt"], state["params"])
        return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], u), "opt": opt},
                {loss_kind: loss, "l2_grads": optax.global_norm(g)})

    return step


# -- stage 3: conditional score distillation ---------------------------------------------------
def fcs_loss(guide, cfg, q, labels, key, s: DD2Settings, aux=None):
    """Denoising score matching of the guidance network on generated q (velocity form)."""
    eps, t, x = draw_noised(key, q, s.noise_draws, s.t_min)
    return losses.velocity_loss(F.velocity(guide, cfg, q, labels, x, t, aux), eps - q[:, None])


def fake_ar_loss(guide, cfg, q, labels, codebook, aux=None):
    """guidance "ar": the AR cross-entropy of the generated codes q [B, L, d] under the guidance
    network's logits (the adapted teacher's network, no CFG) given their prefixes."""
    ids = nearest_code(q, codebook)
    logits = F.teacher_logits(guide, cfg, q, labels, None, aux)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))


def generator_loss(gen, guide, cfg, teacher_params, eps_gen, labels, key, codebook, settings,
                   s: DD2Settings, aux=None):
    """The CSD loss of G(eps_gen) (x_0 form, `losses.csd_loss_x0`)."""
    q = F.generate(gen, cfg, eps_gen, labels, aux)
    k1, k2 = jax.random.split(key)
    shape = q.shape if s.csd_draws == 1 else (q.shape[0], s.csd_draws, *q.shape[1:])
    eps = jax.random.normal(k1, shape, jnp.float32)
    t = jax.random.uniform(k2, shape[:-1], jnp.float32, s.csd_t_min, s.csd_t_max)
    guide = jax.lax.stop_gradient(guide)

    def teacher_mean(x, tt, prefix):
        log_p = jax.lax.stop_gradient(F.teacher_log_probs(teacher_params, cfg, prefix, labels, settings,
                                                          aux))
        return F.mixture_mean(x, tt, log_p, codebook)

    def fake_mean(x, tt, prefix):
        if s.guidance == "ar":  # the generated codes' AR model in the teacher's closed form
            log_p = jax.nn.log_softmax(F.teacher_logits(guide, cfg, prefix, labels, None, aux))
            return F.mixture_mean(x, tt, log_p, codebook)
        return F.denoised(guide, cfg, prefix, labels, x, tt, aux)

    return losses.csd_loss_x0(q, eps, t, teacher_mean, fake_mean, alpha=s.alpha), q


def teacher_score_settings(settings: Any, cfg_scale: float) -> Any:
    """The sampling settings of the teacher's score in CSD: the run's, with the CFG scale
    cfg_scale when it is > 0 (LlamaGen's `cfg_scale`, VAR's `cfg`)."""
    if cfg_scale <= 0:
        return settings
    name = "cfg_scale" if hasattr(settings, "cfg_scale") else "cfg"
    return dataclasses.replace(settings, **{name: float(cfg_scale)})


def random_inputs(key: jax.Array, b: int, cfg: model_lib.DD2Config):
    k1, k2 = jax.random.split(key)
    labels = jax.random.randint(k1, (b,), 0, cfg.num_classes)
    eps = jax.random.normal(k2, (b, cfg.seq_len, cfg.code_dim), jnp.float32)
    return eps, labels


def guide_updates(state, key, cfg, tx_guide, s: DD2Settings, b: int, count: int, aux=None,
                  codebook=None):
    """`count` updates of state["guide"] on fresh generator samples: FCS (guidance "score") or
    the AR cross-entropy of the generated codes (guidance "ar")."""

    def one(carry, k):
        guide, opt = carry
        kk = jax.random.fold_in(key, k)
        eps_gen, labels = random_inputs(jax.random.fold_in(kk, 0), b, cfg)
        q = jax.lax.stop_gradient(F.generate(state["gen"], cfg, eps_gen, labels, aux))
        if s.guidance == "ar":
            loss, g = jax.value_and_grad(fake_ar_loss)(guide, cfg, q, labels, codebook, aux)
        else:
            loss, g = jax.value_and_grad(fcs_loss)(guide, cfg, q, labels, jax.random.fold_in(kk, 1), s,
                                                   aux)
        u, opt = tx_guide.update(g, opt, guide)
        return (optax.apply_updates(guide, u), opt), loss

    (guide, opt), fl = jax.lax.scan(one, (state["guide"], state["guide_opt"]), jnp.arange(count))
    return guide, opt, jnp.mean(fl)


def csd_step(cfg, tx_gen, tx_guide, settings: SamplingSettings, s: DD2Settings, b: int,
             train_generator: bool = True):
    """One iteration: K guidance updates, then (unless aligning) one generator update + EMA."""

    def step(state, batch, rng, teacher_params, codebook, aux):
        del batch
        key = jax.random.fold_in(rng, state["step"])
        guide, guide_opt, fl = guide_updates(state, jax.random.fold_in(key, 0), cfg, tx_guide, s, b,
                                             s.guide_steps, aux, codebook)
        metrics = {"fake_ce" if s.guidance == "ar" else "fcs": fl}
        new = {**state, "step": state["step"] + 1, "guide": guide, "guide_opt": guide_opt}
        if train_generator:
            eps_gen, labels = random_inputs(jax.random.fold_in(key, 1), b, cfg)
            (loss, q), g = jax.value_and_grad(generator_loss, has_aux=True)(
                state["gen"], guide, cfg, teacher_params, eps_gen, labels, jax.random.fold_in(key, 2),
                codebook, settings, s, aux)
            u, gen_opt = tx_gen.update(g, state["gen_opt"], state["gen"])
            gen = optax.apply_updates(state["gen"], u)
            decay = optim.ema_decay_at(state["gen_step"], s.ema_decay, s.ema_warmup)
            new.update(gen=gen, gen_opt=gen_opt, gen_ema=optim.ema_update(state["gen_ema"], gen, decay),
                       gen_step=state["gen_step"] + 1)
            metrics.update(csd=loss, l2_grads_gen=optax.global_norm(g), q_norm=jnp.mean(
                jnp.linalg.norm(q, axis=-1)))
        return new, metrics

    return step


# -- saved outputs ----------------------------------------------------------------------------
def dd2_dir(workdir: str) -> str:
    return os.path.join(workdir, DD2_DIR)


def _load(workdir_or_dir: str, sub: str, kind: str) -> tuple[model_lib.DD2Config, Any]:
    d = workdir_or_dir
    if not os.path.exists(os.path.join(d, "ddjax.json")):
        d = os.path.join(dd2_dir(d), sub)
    params, meta = load_params(d, kind=kind)
    return config_from_json(meta["model_config"]), params


def load_generator(workdir_or_dir: str) -> tuple[model_lib.DD2Config, Any]:
    """(DD2Config, EMA generator params) from WORKDIR (or WORKDIR/dd2/generator)."""
    return _load(workdir_or_dir, GENERATOR_DIR, "dd2")


def load_adapted_teacher(workdir_or_dir: str) -> tuple[model_lib.DD2Config, Any]:
    """(DD2Config, adapted teacher params) from WORKDIR (or WORKDIR/dd2/teacher)."""
    return _load(workdir_or_dir, TEACHER_DIR, "dd2_teacher")


def _save(directory: str, params: Any, kind: str, cfg: model_lib.DD2Config, source: str) -> None:
    host = sharding_lib.to_host(params)  # every process takes part; process 0 writes
    if sharding_lib.is_writer():
        save_params(directory, host, kind=kind, model_config=config_to_json(cfg), source=source,
                    overwrite=True)
    sharding_lib.barrier(f"dd2 saved {directory}")


# -- the pipeline -----------------------------------------------------------------------------
def train(teacher: Teacher, s: DD2Settings, settings: SamplingSettings, *, workdir: str, mesh: Any,
          seed: int = 0, pairs: Any = None, student: tuple[Any, Any] | None = None) -> dict:
    """Runs the stages (module docstring) in WORKDIR/dd2; returns per-stage histories and
    seconds, the adaptation's embedding error and the paths of the saved networks. pairs: DD1's
    PairDataset, needed with warm_steps > 0; student: DD1's (config, params), needed with
    generator="student"."""
    if s.warm_steps and pairs is None:
        raise ValueError("config.dd2.warm_steps > 0 needs DD1's pairs (run the pair stage first)")
    if s.generator == "student" and student is None:
        raise ValueError("config.dd2.generator='student' needs DD1's trained student (run the train "
                         "stage first, or set config.student.checkpoint)")
    s.check(sharding_lib.batch_size_per_step(mesh))
    cfg = model_config(teacher, s)
    if F.is_var(cfg) and s.adapt_steps:
        raise ValueError(f"config.dd2.adapt_steps={s.adapt_steps}: VAR reads continuous tokens as it "
                         "is and has no continuous-input adaptation; set it to 0")
    root = dd2_dir(workdir)
    os.makedirs(root, exist_ok=True)
    meta_path = os.path.join(root, "dd2.json")
    meta = {"model_config": config_to_json(cfg), "settings": s.to_json(),
            "teacher": {"variant": teacher.variant, "checkpoint": teacher.checkpoint}}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        # The generator's kind is not the tuned network's: switching it keeps adapt and tune
        # (the stages after them record it in their inputs).
        own = ("generator", "gen_tau")
        if ({k: v for k, v in old["model_config"].items() if k not in own}
                != {k: v for k, v in meta["model_config"].items() if k not in own}):
            raise ValueError(f"{root} holds DD2 networks of another model config; use a new workdir")
    if sharding_lib.is_writer():
        with open(meta_path, "w") as f:
            json.dump(meta, f, indent=2)
    codebook = jnp.asarray(teacher.codebook, jnp.float32)
    key = jax.random.PRNGKey(seed)
    result: dict[str, Any] = {"stages": {}}
    t_start = time.time()

    data = None
    if (s.adapt_steps and not F.is_var(cfg)) or s.tune_steps:
        t0 = time.time()
        data = teacher_samples(teacher, s, settings, root, seed=seed, mesh=mesh)
        result["samples_seconds"] = time.time() - t0

    # adapt (LlamaGen; VAR reads continuous tokens as it is, so its teacher is DD2's teacher)
    t0 = time.time()
    aux = F.family_aux(teacher)
    if F.is_var(cfg):
        adapted = var_model.adapt_teacher(cfg, teacher.params, jax.random.fold_in(key, 10))
        result["stages"]["adapt"] = {"history": [], "start_step": 0, "seconds": 0.0, "wall": 0.0}
    else:
        table = jnp.asarray(teacher.params["tok_embeddings"]["embedding"], jnp.float32)
        tx = s.adapt_opt.make(s.adapt_steps)

        def adapt_init(p):
            return {"step": jnp.zeros((), jnp.int32), "params": p, "opt": tx.init(p)}

        adapt_dir = os.path.join(root, "adapt")
        start = model_lib.adapt_teacher(cfg, teacher.params, codebook, jax.random.fold_in(key, 10),
                                        s.embed_tau)
        result["adapt_embedding_error"] = embedding_error(start, cfg, table, codebook)
        logging.info("dd2 adapt: the continuous embedding is %.2e (relative) from the token table at "
                     "the codes", result["adapt_embedding_error"])
        state, hist = run_stage("adapt", adapt_dir, init=adapt_init, init_args=(start,),
                                step=adapt_step(cfg, tx), args=(codebook, aux), num_steps=s.adapt_steps,
                                s=s, mesh=mesh, rng=jax.random.fold_in(key, 1),
                                batch=sample_batch(data, s.batch_size, seed, 1) if data else None)
        adapted = state["params"]
        result["stages"]["adapt"] = {**hist, "wall": time.time() - t0}
    _save(os.path.join(root, TEACHER_DIR), adapted, "dd2_teacher", cfg, teacher.checkpoint)

    # tune
    t0 = time.time()
    tx = s.tune_opt.make(s.tune_steps)

    def tune_init(adapted):
        p = F.score_from_teacher(cfg, adapted, jax.random.fold_in(key, 20))
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt": tx.init(p)}

    state, hist = run_stage("tune", os.path.join(root, "tune"), init=tune_init, init_args=(adapted,),
                            inputs={"adapt": s.adapt_steps},
                            step=tune_step(cfg, tx, settings, s, s.tune_head_steps),
                            args=(adapted, codebook, aux), num_steps=s.tune_steps, s=s, mesh=mesh,
                            rng=jax.random.fold_in(key, 2),
                            batch=sample_batch(data, s.batch_size, seed, 2) if data else None)
    tuned = state["params"]
    result["stages"]["tune"] = {**hist, "wall": time.time() - t0}

    # csd (+ optional alignment and more csd)
    tx_gen, tx_guide = s.gen_opt.make(s.csd_steps), s.guide_opt.make(s.csd_steps * s.guide_steps)
    csd_settings = teacher_score_settings(settings, s.csd_cfg)

    generator = tuned
    if s.generator == "student":
        generator = student_generator.from_student(cfg, student)
    if s.warm_steps:
        t0 = time.time()
        tx = s.warm_opt.make(s.warm_steps)
        warm_tau = 1.0  # code_ce: warm_tau x the codebook's typical spacing (host-side, chunked)
        if s.warm_loss == "code_ce":
            warm_tau = s.warm_tau * model_lib.code_spacing(np.asarray(codebook))

        def warm_init(p):
            return {"step": jnp.zeros((), jnp.int32), "params": p, "opt": tx.init(p)}

        state, hist = run_stage("warm", os.path.join(root, "warm"), init=warm_init, init_args=(tuned,),
                                inputs={"adapt": s.adapt_steps, "tune": s.tune_steps},
                                step=warm_step(cfg, tx, s.warm_loss, warm_tau), args=(codebook, aux),
                                num_steps=s.warm_steps, s=s, mesh=mesh, rng=jax.random.fold_in(key, 9),
                                batch=PairBatches(pairs, s.batch_size, seed))
        generator = state["params"]
        result["stages"]["warm"] = {**hist, "wall": time.time() - t0}

    def csd_init(start):
        gen, guide = start
        copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
        return {"step": jnp.zeros((), jnp.int32), "gen_step": jnp.zeros((), jnp.int32),
                "gen": copy(gen), "gen_ema": copy(gen), "gen_opt": tx_gen.init(gen), "guide": copy(guide),
                "guide_opt": tx_guide.init(guide)}

    def restart(state, gen_from_ema: bool = False):
        out = {**state, "step": jnp.zeros((), jnp.int32)}
        return {**out, "gen": state["gen_ema"]} if gen_from_ema else out

    b = s.batch_size
    before = {"adapt": s.adapt_steps, "tune": s.tune_steps, "warm": s.warm_steps}
    if s.generator != "score":
        before.update(generator=s.generator, gen_tau=s.gen_tau)
    if s.guidance != "score":
        before.update(guidance=s.guidance)
    one_guide = dataclasses.replace(s, guide_steps=1)
    stages = []
    if s.guide_warm_steps:  # the guidance first learns the starting generator's distribution
        stages.append(("guide_warm", s.guide_warm_steps, csd_init, False, one_guide))
    stages.append(("csd", s.csd_steps, restart if stages else csd_init, True, s))
    if s.align_steps:
        stages.append(("align", s.align_steps, lambda st: restart(st, True), False, one_guide))
        if s.align_csd_steps:
            stages.append(("csd_after", s.align_csd_steps, restart, True, s))
    state = (generator, adapted if s.guidance == "ar" else tuned)
    for i, (name, steps, init, train_gen, ss) in enumerate(stages):
        t0 = time.time()
        state, hist = run_stage(name, os.path.join(root, name), init=init, init_args=(state,),
                                inputs=dict(before),
                                step=csd_step(cfg, tx_gen, tx_guide, csd_settings, ss, b, train_gen),
                                args=(adapted, codebook, aux), num_steps=steps, s=s, mesh=mesh,
                                rng=jax.random.fold_in(key, 3 + i))
        result["stages"][name] = {**hist, "wall": time.time() - t0}
        before[name] = steps
    gen_dir = os.path.join(root, GENERATOR_DIR)
    _save(gen_dir, state["gen_ema"], "dd2", cfg, teacher.checkpoint)
    result.update(generator_dir=gen_dir, teacher_dir=os.path.join(root, TEACHER_DIR),
                  seconds=time.time() - t_start, final_state=state, tuned=tuned, adapted=adapted,
                  config=cfg)
    return result


__all__ = ["DD2Settings", "OptSettings", "settings_from_dict", "train", "load_generator",
           "load_adapted_teacher", "run_stage", "latest_step", "generator_loss", "fcs_loss", "gts_loss",
           "csd_step", "tune_step", "adapt_step", "embedding_error", "model_config", "STAGES"]
