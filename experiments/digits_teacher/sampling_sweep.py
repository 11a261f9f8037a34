"""Class accuracy of the shipped digits teacher's samples over sampling settings.

    python experiments/digits_teacher/sampling_sweep.py                 # the README's table
    python experiments/digits_teacher/sampling_sweep.py --num 100 --settings 1.5,32,1.0

Samples the shipped teacher (`ddjax/assets/digits`, float16 weights loaded as float32) at each
(cfg_scale, top_k, temperature) setting, labels cycling through the ten classes, decodes with
the shipped VQ and classifies the images with `digits_classifier` (the RBF-SVC of
`ddjax.demo.common`, fitted on all 1797 digits). Each setting gets --num samples with
--seed; the settings in --confirm also get --confirm-num samples with --confirm-seed. Prints a
markdown table. Accuracy does not depend on the machine's load; a run takes a few minutes on
2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddjax.demo.common import classify_digits, digits_classifier, digits_teacher_paths  # noqa: E402
from ddjax.demo.digits_teacher import sample_images  # noqa: E402
from ddjax.teacher.llamagen import gpt as gpt_lib  # noqa: E402
from ddjax.teacher.llamagen import vq as vq_lib  # noqa: E402
from ddjax.teacher.llamagen.loading import load_gpt, load_vq  # noqa: E402
from ddjax.teacher.llamagen.sampling import SamplingSettings  # noqa: E402

# (cfg_scale, top_k, temperature): the first release's sweep, then the shipped setting.
SETTINGS = ("1.0,0,1.0 2.0,0,1.0 3.0,0,1.0 4.0,0,1.0 2.0,16,1.0 3.0,16,1.0 3.0,32,1.0 "
            "4.0,16,1.0 3.0,0,0.9 1.5,32,1.0")
CONFIRM = "3.0,0,1.0 2.0,16,1.0 3.0,32,1.0 3.0,0,0.9 1.5,32,1.0"


def parse(spec: str) -> list[tuple[float, int, float]]:
    out = []
    for item in spec.split():
        cfg, k, t = item.split(",")
        out.append((float(cfg), int(k), float(t)))
    return out


def accuracy(teacher, clf, setting, num: int, seed: int, batch: int) -> float:
    cfg, k, t = setting
    labels = np.arange(num, dtype=np.int32) % 10
    settings = SamplingSettings(cfg_scale=cfg, top_k=k, temperature=t)
    images, _ = sample_images(teacher["gpt"], teacher["gcfg"], teacher["vq"], teacher["vcfg"],
                              labels, jax.random.PRNGKey(seed), settings, batch=batch)
    return float((classify_digits(clf, images) == labels).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=SETTINGS, help="space-separated cfg,top_k,temperature")
    p.add_argument("--num", type=int, default=300)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--confirm", default=CONFIRM)
    p.add_argument("--confirm-num", type=int, default=1000)
    p.add_argument("--confirm-seed", type=int, default=7)
    p.add_argument("--batch", type=int, default=100)
    args = p.parse_args(argv)

    paths = digits_teacher_paths()
    with open(paths["meta"]) as f:
        meta = json.load(f)
    vcfg = vq_lib.vq_config(meta["vq"]["variant"], **meta["vq"]["model"])
    gcfg = gpt_lib.gpt_config(meta["gpt"]["variant"], **meta["gpt"]["model"])
    teacher = dict(gpt=load_gpt(paths["gpt"], gcfg), gcfg=gcfg, vq=load_vq(paths["vq"], vcfg),
                   vcfg=vcfg)
    clf = digits_classifier()
    confirm = set(parse(args.confirm)) if args.confirm_num else set()
    print(f"| cfg_scale | top_k | temperature | accuracy ({args.num}, seed {args.seed}) | "
          f"accuracy ({args.confirm_num}, seed {args.confirm_seed}) |")
    print("|---|---|---|---|---|")
    for setting in parse(args.settings):
        a = accuracy(teacher, clf, setting, args.num, args.seed, args.batch)
        b = (f"{100 * accuracy(teacher, clf, setting, args.confirm_num, args.confirm_seed, args.batch):.1f}%"
             if setting in confirm else "")
        print(f"| {setting[0]} | {setting[1]} | {setting[2]} | {100 * a:.1f}% | {b} |", flush=True)


if __name__ == "__main__":
    main()
