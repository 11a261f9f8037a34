"""Sampling, evaluation and the whole DD pipeline (modes sample, evaluate, all).

`all` runs generate -> train -> evaluate; each stage is resumable and a rerun skips finished
stages (pairs and checkpoints are checked, `evaluate` rewrites the report).
The report compares, on the same noise and class labels: the teacher (its deterministic
flow map, full steps), DD 1-step, DD with t_list, teacher-involved DD, and the onestep*
baseline (each token drawn from its per-class, per-position marginal of teacher samples).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ddjax import run as run_lib
from ddjax.mapper.sequence import map_noise_to_tokens
from ddjax.student.model import nearest_code
from ddjax.student.sampling import StudentApply, sample_dd, sample_teacher_involved, steps_of
from ddjax.teacher import sampling as sampling_lib
from ddjax.teacher import vq as vq_lib
from ddjax.utils.images import save_grid


# -- models -------------------------------------------------------------------------------
def load_student(config: Any, workdir: str):
    """(DDConfig, params): config.student.checkpoint (a ddjax dd dir, .pt/.safetensors, or a
    training workdir), else the latest EMA params of the training run in `workdir`."""
    from ddjax.student import train as train_lib  # noqa: PLC0415

    path = config.student.checkpoint
    if not path:
        cfg, params, meta = train_lib.load_student(workdir)
        logging.info("student: training step %d of %s (EMA)", meta["step"], workdir)
        return cfg, params
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "params")):
        from ddjax.convert.api import load_jax  # noqa: PLC0415

        params, cfg = load_jax(path, kind="dd")
        return cfg, params
    if os.path.isdir(path):
        cfg, params, _ = train_lib.load_student(path)
        return cfg, params
    from ddjax.student.loading import load_dd  # noqa: PLC0415
    from ddjax.student.model import dd_config  # noqa: PLC0415

    cfg = dd_config(run_lib.teacher_config(config), run_lib.vq_config(config).codebook_embed_dim)
    return cfg, load_dd(path, cfg)


def eval_inputs(config: Any, num: int, seq_len: int, dim: int, num_classes: int):
    """The shared evaluation noise [N, L, d] and balanced labels [N] (seeded)."""
    key = jax.random.PRNGKey(config.eval.seed)
    noise = np.asarray(jax.random.normal(key, (num, seq_len, dim), jnp.float32))
    labels = np.random.default_rng(config.eval.seed).permutation(np.arange(num) % num_classes)
    return noise, labels.astype(np.int32)


def latents_to_images(vparams, vcfg, latents: jax.Array) -> np.ndarray:
    b, n, d = latents.shape
    g = math.isqrt(n)
    images = vq_lib.decode_latents(vparams, vcfg, latents.reshape(b, g, g, d))
    return np.clip(np.asarray(images), -1.0, 1.0)  # as LlamaGen clamps decoded samples


def _batched(fn: Callable, noise: np.ndarray, labels: np.ndarray, bs: int) -> tuple[np.ndarray, float]:
    """Runs fn over batches; returns (outputs, seconds per image measured after a warm-up)."""
    outs = []
    fn(jnp.asarray(noise[:bs]), jnp.asarray(labels[:bs])).block_until_ready()  # compile
    t0 = time.perf_counter()
    for i in range(0, len(noise), bs):
        out = fn(jnp.asarray(noise[i:i + bs]), jnp.asarray(labels[i:i + bs]))
        outs.append(np.asarray(out.block_until_ready()))
    return np.concatenate(outs), (time.perf_counter() - t0) / len(noise)


# -- methods ------------------------------------------------------------------------------
def build_methods(config: Any, workdir: str, teacher, vq, student) -> dict[str, dict]:
    """name -> {"fn": (noise, labels) -> latents [B, L, d], "steps": int}."""
    tcfg, tparams = teacher
    vcfg, vparams = vq
    scfg, sparams = student
    codebook = jnp.asarray(run_lib.vq_codebook(vparams, vcfg))
    settings = sampling_lib.settings_from_config(config.sampling)
    flow = run_lib.flow_settings(config)
    t_list, split_t = tuple(config.dd.t_list), config.dd.split_t
    net = StudentApply(scfg)
    key = jax.random.PRNGKey(config.eval.seed + 1)
    methods = {
        "teacher": {"steps": tcfg.block_size, "fn": lambda n, lab: codebook[map_noise_to_tokens(
            tparams, tcfg, n, lab, codebook, settings, flow)]},
        "DD 1-step": {"steps": 1, "fn": lambda n, lab: sample_dd(net, sparams, n, lab, codebook, (0,),
                                                                 split_t)},
        f"DD {len(t_list)}-step": {"steps": len(t_list), "fn": lambda n, lab: sample_dd(
            net, sparams, n, lab, codebook, t_list, split_t)},
    }
    ts = config.dd.teacher_start
    if len(t_list) == 2 and 0 <= ts < t_list[1]:
        methods["teacher-involved"] = {
            "steps": steps_of(t_list, ts),
            "fn": lambda n, lab: sample_teacher_involved(
                net, sparams, tparams, tcfg, n, lab, codebook, key, t_list=t_list, teacher_start=ts,
                split_t=config.dd.get("teacher_split_t", split_t), settings=settings)}
    marg = marginals(config, workdir, tcfg)
    if marg is not None:
        methods["onestep*"] = {"steps": 1, "fn": onestep_baseline(marg, codebook, config.eval.seed + 2)}
    return methods


def marginals(config: Any, workdir: str, tcfg) -> np.ndarray | None:
    """Per-class, per-position token frequencies of the teacher's samples (the pair dataset):
    [C, L, K] with add-1/K smoothing, or None without pairs."""
    from ddjax.mapper.pairs import PairDataset  # noqa: PLC0415

    try:
        data = PairDataset(run_lib.pairs_dir(config, workdir), verify=False).load_all()
    except (FileNotFoundError, ValueError):
        return None
    counts = np.zeros((tcfg.num_classes, tcfg.block_size, tcfg.vocab_size), np.float64)
    np.add.at(counts, (data["labels"][:, None], np.arange(tcfg.block_size)[None, :], data["tokens"]), 1)
    counts += 1.0 / tcfg.vocab_size
    return (counts / counts.sum(-1, keepdims=True)).astype(np.float32)


def onestep_baseline(marg: np.ndarray, codebook: jax.Array, seed: int):
    """Every token drawn independently from its per-class, per-position marginal."""
    logm = jnp.log(jnp.asarray(marg))
    calls = [0]

    def fn(noise, labels):
        calls[0] += 1
        key = jax.random.fold_in(jax.random.PRNGKey(seed), calls[0])
        return codebook[jax.random.categorical(key, logm[labels], axis=-1)]

    return fn


# -- evaluation ---------------------------------------------------------------------------
def get_extractor(config: Any):
    from ddjax.evaluate.features import get_extractor as get  # noqa: PLC0415

    return get(config.eval.extractor, config.eval.extractor_weights or None)


def reference_features(config: Any, extractor, image_size: int):
    """Real-data features for FID/precision/recall (the digits), or a stats file's path."""
    ref = config.eval.reference
    if ref == "digits":
        from ddjax.evaluate.digits import digits_images  # noqa: PLC0415

        return extractor(digits_images(size=image_size)[0])
    if not ref:
        raise ValueError("config.eval.reference is empty: give FID reference statistics (.npz with "
                         "mu and sigma for the extractor's features) or 'digits'")
    if not os.path.exists(ref):
        raise FileNotFoundError(f"config.eval.reference not found: {ref}")
    return ref


def mode_evaluate(config: Any, workdir: str) -> dict:
    """Samples every method on the same noise/labels, scores them, writes report.md + PNGs."""

    teacher = run_lib.load_teacher(config)
    vq = run_lib.load_vq(config)
    student = load_student(config, workdir)
    tcfg, vcfg, vparams = teacher[0], vq[0], vq[1]
    codebook = run_lib.vq_codebook(vparams, vcfg)
    n = config.eval.num_samples
    noise, labels = eval_inputs(config, n, tcfg.block_size, codebook.shape[1], tcfg.num_classes)
    methods = build_methods(config, workdir, teacher, vq, student)
    extractor = get_extractor(config)
    out_dir = os.path.join(workdir, "report")
    os.makedirs(out_dir, exist_ok=True)
    results, feats, tokens = {}, {}, {}
    for name, m in methods.items():
        logging.info("evaluate: sampling %s (%d images)", name, n)
        latents, sec = _batched(m["fn"], noise, labels, config.eval.batch_size)
        tokens[name] = np.asarray(nearest_code(jnp.asarray(latents), jnp.asarray(codebook)))
        images = np.concatenate([latents_to_images(vparams, vcfg, jnp.asarray(latents[i:i + 256]))
                                 for i in range(0, n, 256)])
        feats[name] = extractor(images)
        save_grid(os.path.join(out_dir, f"{slug(name)}.png"), images[: config.eval.grid_size],
                  nrow=int(math.sqrt(config.eval.grid_size)), scale=max(1, 64 // images.shape[1]))
        results[name] = {"steps": m["steps"], "latency_s": sec}
    ref = reference_features(config, extractor, vcfg.downsample_factor * tcfg.grid_size)
    for name in methods:
        r = results[name]
        r.update(score_features(feats[name], ref))
        r["protocol"] = extractor.protocol
        r["fid_vs_teacher"] = fid_from_features(feats[name], feats["teacher"]) if name != "teacher" else 0.0
        r["token_agreement"] = float((tokens[name] == tokens["teacher"]).mean())
        r["speedup"] = results["teacher"]["latency_s"] / r["latency_s"]
    floor = data_fid_floor(ref, config.eval.seed)
    report = write_report(config, workdir, out_dir, results, fid_floor=floor)
    return {"results": results, "report": report, "fid_floor": floor}


def data_fid_floor(reference: Any, seed: int, splits: int = 5) -> float | None:
    """Mean FID between two random halves of the reference features [M, F] over `splits` seeded
    splits (None for a stats file): what finite samples alone give two draws of one distribution."""
    if isinstance(reference, str):
        return None
    rng = np.random.default_rng(seed)
    half = len(reference) // 2
    fids = []
    for _ in range(splits):
        perm = rng.permutation(len(reference))
        fids.append(fid_from_features(reference[perm[:half]], reference[perm[half:2 * half]]))
    return float(np.mean(fids))


def score_features(features: np.ndarray, reference: Any) -> dict:
    """FID against reference features [M, F] or a stats .npz; k-NN precision/recall against
    reference features (None with statistics only)."""
    from ddjax.evaluate.fid import feature_statistics, frechet_distance, load_statistics  # noqa: PLC0415
    from ddjax.evaluate.prdc import prdc  # noqa: PLC0415

    if isinstance(reference, str):
        stats = load_statistics(reference)
        mu, sigma = feature_statistics(features)
        return {"fid": float(frechet_distance(mu, sigma, stats.mu, stats.sigma)), "precision": None,
                "recall": None}
    out = prdc(reference, features)
    return {"fid": fid_from_features(features, reference), "precision": float(out["precision"]),
            "recall": float(out["recall"])}


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    from ddjax.evaluate.fid import fid_from_features as fid  # noqa: PLC0415

    return float(fid(a, b))


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def write_report(config: Any, workdir: str, out_dir: str, results: dict, fid_floor: float | None = None
                 ) -> str:
    """report.md (table, grids, protocol), results.json and quality_vs_steps.png."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    plot = plot_results(results, os.path.join(out_dir, "quality_vs_steps.png"))
    rows = ["| method | steps | latency / image (ms) | speed-up | FID vs data | FID vs teacher | "
            "precision | recall | token agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['steps']} | {1e3 * r['latency_s']:.2f} | {r['speedup']:.1f}x | "
                    f"{_fmt(r.get('fid'))} | {_fmt(r.get('fid_vs_teacher'))} | {_fmt(r.get('precision'))} | "
                    f"{_fmt(r.get('recall'))} | {_fmt(r.get('token_agreement'), 3)} |")
    t = results["teacher"]["fid"]
    checks = paper_shape_checks(results)
    lines = [
        "# ddjax report",
        "",
        f"Teacher `{config.teacher.variant}` ({config.teacher.checkpoint or 'random'}), "
        f"{config.eval.num_samples} samples per method on the same noise and class labels.",
        f"FID protocol: {results['teacher'].get('protocol', config.eval.extractor)}; "
        f"reference: {config.eval.reference}.",
        f"Teacher sampling: cfg_scale {config.sampling.cfg_scale}, top_k {config.sampling.top_k}, "
        f"top_p {config.sampling.top_p}, temperature {config.sampling.temperature}; "
        f"DD t_list {tuple(config.dd.t_list)}, split_t {config.dd.split_t}, "
        f"teacher_start {config.dd.teacher_start}.",
        "The teacher row is the teacher's deterministic flow map of the same noise (its own "
        "samples); token agreement compares each method's tokens with it.",
        "",
        *rows,
        "",
        "## The paper's shape",
        "",
        *[f"- {'PASS' if ok else 'MISS'}: {text}" for text, ok in checks],
        "",
        f"Teacher FID {t:.2f}." if t is not None else "",
        "" if fid_floor is None else
        f"For scale: two random halves of the reference data ({config.eval.reference}) have FID "
        f"{fid_floor:.2f} against each other (mean of 5 splits); finite samples alone give that much.",
        "",
        f"![quality vs steps]({os.path.basename(plot)})",
        "",
        *[f"### {name}\n\n![{name}]({slug(name)}.png)\n" for name in results],
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    logging.info("wrote %s", path)
    for text, ok in checks:
        (logging.info if ok else logging.warning)("%s: %s", "PASS" if ok else "MISS", text)
    return path


def paper_shape_checks(results: dict) -> list[tuple[str, bool]]:
    """The qualitative claims of the paper, as (statement, holds) pairs."""
    fid = {k: v.get("fid") for k, v in results.items()}
    t = fid.get("teacher")
    checks = []
    two = next((k for k in fid if k.startswith("DD ") and k != "DD 1-step"), None)
    if t is not None and "DD 1-step" in fid:
        checks.append((f"DD 1-step FID ({fid['DD 1-step']:.2f}) <= 3x the teacher's ({t:.2f})",
                       fid["DD 1-step"] <= 3 * t))
    if two and "DD 1-step" in fid:
        checks.append((f"{two} FID ({fid[two]:.2f}) better than 1-step ({fid['DD 1-step']:.2f})",
                       fid[two] < fid["DD 1-step"]))
    if two and "teacher-involved" in fid:
        checks.append((f"teacher-involved FID ({fid['teacher-involved']:.2f}) better than {two} "
                       f"({fid[two]:.2f})", fid["teacher-involved"] < fid[two]))
    if t is not None and "onestep*" in fid:
        checks.append((f"onestep* FID ({fid['onestep*']:.2f}) >= 5x the teacher's ({t:.2f})",
                       fid["onestep*"] >= 5 * t))
    return checks


def plot_results(results: dict, path: str) -> str:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        for ax, x in zip(axes, (r["steps"], 1e3 * r["latency_s"])):
            ax.scatter([x], [r["fid"]], s=40)
            ax.annotate(name, (x, r["fid"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for ax, label in zip(axes, ("network evaluations per image", "latency per image (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("FID vs data (lower is better)")
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against steps and latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- sample -------------------------------------------------------------------------------
def mode_sample(config: Any, workdir: str) -> dict:
    """DD samples (1-step, t_list, teacher-involved) as PNG grids + latents .npz."""
    teacher = run_lib.load_teacher(config)
    vq = run_lib.load_vq(config)
    student = load_student(config, workdir)
    tcfg, (vcfg, vparams) = teacher[0], vq
    codebook = run_lib.vq_codebook(vparams, vcfg)
    n = config.dd.num_images
    noise, labels = eval_inputs(config, n, tcfg.block_size, codebook.shape[1], tcfg.num_classes)
    if config.sampling.labels:
        labels = run_lib.class_labels(config, n, tcfg.num_classes, config.seed)
    out = {}
    for name, m in build_methods(config, workdir, teacher, vq, student).items():
        if name in ("teacher", "onestep*"):
            continue
        latents, sec = _batched(m["fn"], noise, labels, min(config.dd.batch_size, n))
        images = latents_to_images(vparams, vcfg, jnp.asarray(latents))
        path = save_grid(os.path.join(workdir, f"samples_{slug(name)}.png"), images,
                         scale=max(1, 64 // images.shape[1]))
        np.savez(os.path.join(workdir, f"samples_{slug(name)}.npz"), latents=latents, labels=labels)
        logging.info("%s: %d images, %.2f ms/image -> %s", name, n, 1e3 * sec, path)
        out[name] = path
    return out


def mode_train(config: Any, workdir: str) -> dict:
    from ddjax.student.train import train  # noqa: PLC0415

    return train(config, workdir)


def mode_all(config: Any, workdir: str) -> dict:
    """generate -> train -> evaluate, skipping what is already done."""
    from ddjax.student import train as train_lib  # noqa: PLC0415

    t0 = time.time()
    logging.info("[1/3] pairs")
    run_lib.mode_generate(config, workdir)
    logging.info("[2/3] student (%.0f s so far)", time.time() - t0)
    try:
        _, _, meta = train_lib.load_student(workdir)
        done = meta["step"] >= config.train.num_steps
    except (FileNotFoundError, ValueError):
        done = False
    if done:
        logging.info("student already trained to step %d: skipping", config.train.num_steps)
    else:
        mode_train(config, workdir)
    logging.info("[3/3] evaluation and report (%.0f s so far)", time.time() - t0)
    result = mode_evaluate(config, workdir)
    logging.info("done in %.0f s: %s", time.time() - t0, result["report"])
    return result
