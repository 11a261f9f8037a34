r"""Trains the VAR demo's student with a recipe on existing pairs and scores its DD rows.

    python experiments/var_digits_demo/recipe.py --pairs /tmp/var_dd/pairs --workdir /tmp/rec_lr6 \
        train.lr=6e-3 train.num_steps=840 dd.split_t=130

The pairs are those of a finished `python -m ddjax.main --config=configs/var.py --workdir=...`
run (linked, not copied); overrides are configs/var.py:digits keys (values as Python literals).
A workdir whose student already reached train.num_steps is only scored, so sampling settings
(dd.split_t, dd.teacher_start) can be compared on one student. Scores follow the report's
protocol for the DD rows: the report's evaluation noise and labels (eval.seed,
eval.num_samples), uint8 quantisation, the digits classifier's features, FID against the 1797
digits. Prints one JSON line and writes WORKDIR/recipe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ddjax.app import build, modes  # noqa: E402
from ddjax.app.settings import read_settings  # noqa: E402
from ddjax.configs_path import apply_overrides, load_config  # noqa: E402
from ddjax.evaluate.fid import fid_from_features  # noqa: E402
from ddjax.evaluate.report import eval_inputs  # noqa: E402
from ddjax.utils.batching import map_batches  # noqa: E402
from ddjax.utils.images import save_image_uint8  # noqa: E402

ROWS = ("DD 1-step", "DD 2-step", "teacher-involved")
LOGGED = ("ce", "ce_t0", "ce_t30", "acc_t0", "mse", "examples_per_sec")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", required=True, help="the pairs directory of a finished demo run")
    p.add_argument("--workdir", required=True)
    p.add_argument("--rows", default=",".join(ROWS), help="which DD rows to score")
    p.add_argument("overrides", nargs="*", help="key=value (configs/var.py:digits keys)")
    args = p.parse_args()
    config = apply_overrides(load_config("var", "digits"), args.overrides)
    if not os.path.isdir(args.pairs):
        raise FileNotFoundError(f"--pairs: no such directory {args.pairs}")
    os.makedirs(args.workdir, exist_ok=True)
    link = build.pairs_dir(config, args.workdir)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(args.pairs), link)
    run = modes.Run(config, read_settings(config), args.workdir)
    t0 = time.time()
    trained = modes.mode_train(run)
    out = {"overrides": args.overrides, "train_s": round(time.time() - t0, 1),
           "final_metrics": {k: round(float(v), 4) for k, v in trained["metrics"].items() if k in LOGGED}}
    teacher, ev = run.teacher, run.settings.eval
    methods = modes._methods(run, with_baseline=False)
    features = build.extractor(config)
    reference = features(save_image_uint8(build.reference(config, teacher.image_size, features,
                                                          args.workdir)))
    noise, labels = eval_inputs(ev.seed, ev.num_samples, teacher.seq_len, teacher.code_dim,
                                teacher.num_classes)
    rows = np.arange(ev.num_samples)
    for name in args.rows.split(","):
        if name not in methods:
            raise ValueError(f"--rows: no method {name!r}; have {sorted(methods)}")
        latents, _ = map_batches(methods[name].fn, (noise, labels, rows), ev.batch_size, warmup=False)
        images = np.asarray(teacher.decode_latents(latents))
        out[name] = round(fid_from_features(features(save_image_uint8(images)), reference), 2)
    print(json.dumps(out))
    with open(os.path.join(args.workdir, "recipe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
