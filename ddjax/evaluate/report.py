"""The DD evaluation stage: every method on the same noise and labels, scored, and the report.

    result = evaluate(teacher, methods, EvalSettings(...), extractor, reference, out_dir,
                      description=[...])

Images are quantised to uint8 exactly as the official scripts' PNGs (`save_image_uint8`)
before the features, for the samples and for a reference given as images. FID, k-NN precision
and recall come from `ddjax.evaluate.scoring.score_features`; the speed-up column is against
the teacher's ancestral sampler timed in the same run; token agreement is against the
teacher's flow map of the same noise. Writes OUT/report.md, results.json,
quality_vs_steps.png and one PNG grid per method (process 0 only; every process samples its
block of the rows and the scores use all of them, gathered).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from ddjax import sharding
from ddjax.evaluate.features import FeatureExtractor
from ddjax.evaluate.fid import fid_from_features
from ddjax.evaluate.methods import FLOW_MAP, ONESTEP, TEACHER, Method
from ddjax.evaluate.reference import parse_tfds
from ddjax.evaluate.scoring import score_features
from ddjax.student.model import nearest_code
from ddjax.teacher.base import Teacher
from ddjax.utils.batching import map_batches
from ddjax.utils.images import save_grid, save_image_uint8

PROTOCOL_NOTE = "uint8 PNG quantisation (torchvision save_image) before the features"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What the evaluation reads (config.eval holds the same fields)."""

    num_samples: int = 1000  # images per method, on the same noise and labels
    batch_size: int = 100
    seed: int = 1234
    extractor: str = "inception"  # or "digits" (the demo's classifier features)
    extractor_weights: str = ""  # pytorch-fid Inception .pth/.npz; digits classifier .npz
    reference: str = ""  # FID reference: stats .npz (mu, sigma), tfds:NAME/SPLIT or "digits"
    tfds_data_dir: str = ""  # data_dir of a tfds: reference ("" = TFDS's default); never downloads
    grid_size: int = 64  # images per PNG grid

    def check(self) -> None:
        for name in ("num_samples", "batch_size", "grid_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.eval.{name} must be positive, got {getattr(self, name)}")
        if not self.reference:
            raise ValueError("config.eval.reference is empty: give FID reference statistics (.npz "
                             "with mu and sigma for the extractor's features), tfds:NAME/SPLIT "
                             "or 'digits'")
        parse_tfds(self.reference)  # a malformed tfds: reference raises here


def eval_inputs(seed: int, num: int, seq_len: int, dim: int, num_classes: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """The shared evaluation noise [N, L, d] and balanced labels [N] (seeded)."""
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (num, seq_len, dim)))
    labels = np.random.default_rng(seed).permutation(np.arange(num) % max(num_classes, 1))
    return noise.astype(np.float32), labels.astype(np.int32)


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")


def _fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def data_fid_floor(reference: Any, seed: int, splits: int = 5) -> float | None:
    """Mean FID between two random halves of the reference features [M, F] over `splits` seeded
    splits (None for statistics): what finite samples alone give two draws of one distribution."""
    if not isinstance(reference, np.ndarray):
        return None
    rng = np.random.default_rng(seed)
    half = len(reference) // 2
    fids = []
    for _ in range(splits):
        perm = rng.permutation(len(reference))
        fids.append(fid_from_features(reference[perm[:half]], reference[perm[half:2 * half]]))
    return float(np.mean(fids))


def evaluate(teacher: Teacher, methods: dict[str, Method], settings: EvalSettings,
             extractor: FeatureExtractor, reference: Any, out_dir: str, *,
             description: list[str] = (), condition_classes: np.ndarray | None = None) -> dict:
    """Samples every method, scores it and writes the report.

    reference: real images [M, H, W, 3] in [-1, 1] (quantised and featurised here), features
    [M, F], or a statistics `.npz` path. condition_classes [num_classes]: the class each
    condition names (-1: none), for the class-agreement column when the extractor classifies.
    Returns {"results", "report", "fid_floor"} on every process; with several processes the
    rows are split over them (`sharding.process_rows`), the results are computed from all rows
    gathered, and only process 0 writes into out_dir.
    """
    settings.check()
    for need in (TEACHER, FLOW_MAP, ONESTEP):
        if need not in methods:
            raise ValueError(f"the report needs the {need!r} method")
    n = settings.num_samples
    noise, labels = eval_inputs(settings.seed, n, teacher.seq_len, teacher.code_dim, teacher.num_classes)
    rows = np.arange(n, dtype=np.int64)
    # With several processes each samples its block of rows; tokens, features, the grid's
    # images and the latency are gathered, and process 0 alone writes files.
    lo, hi = sharding.process_rows(n)
    per, grid_rows = -(-n // jax.process_count()), min(settings.grid_size, n)
    writer = sharding.is_writer()
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    results, feats, tokens, shown = {}, {}, {}, {}
    codebook = np.asarray(teacher.codebook)
    for name, m in methods.items():
        logging.info("evaluate: sampling %s (%d images, rows %d-%d here)", name, n, lo, hi)
        latents, sec = map_batches(m.fn, (noise[lo:hi], labels[lo:hi], rows[lo:hi]),
                                   settings.batch_size, warmup=True)
        tokens[name] = sharding.gather_rows(np.asarray(nearest_code(latents, codebook)), per)
        images = np.concatenate([teacher.decode_latents(latents[i:i + 256])
                                 for i in range(0, hi - lo, 256)])
        out = extractor.extract(save_image_uint8(images))
        feats[name] = sharding.gather_rows(out["features"], per)
        if condition_classes is not None and "class_logits" in out:
            shown[name] = sharding.gather_rows(np.argmax(out["class_logits"], -1), per)
        grid = sharding.gather_rows(images[:max(0, min(hi, grid_rows) - lo)], grid_rows)
        if writer:
            save_grid(os.path.join(out_dir, f"{slug(name)}.png"), grid[:grid_rows],
                      nrow=int(math.sqrt(settings.grid_size)), scale=max(1, 64 // images.shape[1]))
        sec = float(np.mean(sharding.gather_rows(np.asarray([sec]), 1)))
        results[name] = {"steps": m.steps, "latency_s": sec}
    if isinstance(reference, np.ndarray) and reference.ndim == 4:
        reference = extractor(save_image_uint8(reference))
    for name in methods:
        r = results[name]
        r.update(score_features(feats[name], reference, protocol=extractor.protocol))
        r["protocol"] = f"{extractor.protocol}; {PROTOCOL_NOTE}"
        r["fid_vs_teacher"] = 0.0 if name == TEACHER else fid_from_features(feats[name], feats[TEACHER])
        r["token_agreement"] = float((tokens[name] == tokens[FLOW_MAP]).mean())
        if name in shown:  # does the image show the class its condition names?
            named = np.asarray(condition_classes)[labels]
            known = named >= 0
            r["class_agreement"] = float((shown[name][known] == named[known]).mean())
        r["speedup"] = results[TEACHER]["latency_s"] / r["latency_s"]
    floor = data_fid_floor(reference, settings.seed)
    path = os.path.join(out_dir, "report.md")
    if writer:
        path = write_report(out_dir, results, description=list(description),
                            reference=settings.reference, fid_floor=floor)
    return {"results": results, "report": path, "fid_floor": floor}


def write_report(out_dir: str, results: dict, *, description: list[str], reference: str,
                 fid_floor: float | None = None) -> str:
    """report.md (table, checks, grids, protocol), results.json and quality_vs_steps.png."""
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    plot = plot_results(results, os.path.join(out_dir, "quality_vs_steps.png"))
    agree = any("class_agreement" in r for r in results.values())
    rows = ["| method | steps | latency / image (ms) | speed-up | FID vs data | FID vs teacher | "
            "precision | recall | token agreement |" + (" class agreement |" if agree else ""),
            "|---|---|---|---|---|---|---|---|---|" + ("---|" if agree else "")]
    for name, r in results.items():
        rows.append(f"| {name} | {r['steps']} | {1e3 * r['latency_s']:.2f} | {r['speedup']:.1f}x | "
                    f"{_fmt(r.get('fid'))} | {_fmt(r.get('fid_vs_teacher'))} | {_fmt(r.get('precision'))} | "
                    f"{_fmt(r.get('recall'))} | {_fmt(r.get('token_agreement'), 3)} |"
                    + (f" {_fmt(r.get('class_agreement'), 3)} |" if agree else ""))
    checks = paper_shape_checks(results)
    t = results[TEACHER]["fid"]
    lines = [
        "# ddjax report", "", *description,
        f"FID protocol: {results[TEACHER].get('protocol')}; reference: {reference}.",
        f"`{TEACHER}` is the teacher's ancestral sampler (the speed-up column is against it); "
        f"`{FLOW_MAP}` is its deterministic flow map of the same noise, and token agreement "
        "compares each method's tokens with the flow map's."
        + (" Class agreement: the fraction of images the digits classifier reads as the class "
           "their condition names (for a caption, the digit it names)." if agree else ""),
        "", *rows, "", "## The paper's shape", "",
        *[f"- {'PASS' if ok else 'MISS'}: {text}" for text, ok in checks], "",
        f"Teacher FID {t:.2f}.",
        "" if fid_floor is None else
        f"For scale: two random halves of the reference data ({reference}) have FID "
        f"{fid_floor:.2f} against each other (mean of 5 splits); finite samples alone give that much.",
        "", f"![quality vs steps]({os.path.basename(plot)})", "",
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
    t = fid.get(TEACHER)
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
    if "DD2 1-step" in fid and "DD 1-step" in fid:
        checks.append((f"DD2 1-step FID ({fid['DD2 1-step']:.2f}) better than DD 1-step "
                       f"({fid['DD 1-step']:.2f})", fid["DD2 1-step"] < fid["DD 1-step"]))
    if t is not None and ONESTEP in fid:
        checks.append((f"onestep* FID ({fid[ONESTEP]:.2f}) >= 5x the teacher's ({t:.2f})",
                       fid[ONESTEP] >= 5 * t))
    return checks


def plot_results(results: dict, path: str) -> str:
    import matplotlib  # the backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
