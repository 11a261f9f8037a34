r"""Scores DD2 networks of the digits demo the way the report does (same noise, labels,
extractor and reference): FID / precision / recall.

    python experiments/dd2_digits/score.py --workdir DIR [--num 1000] [--continuous]
    python experiments/dd2_digits/score.py --workdir DIR --sampler ar_diffusion --num 500
    python experiments/dd2_digits/score.py --config configs/var.py --workdir DIR   # the VAR demo

one_step: the EMA generator in DIR/dd2/generator (`DD2 1-step`; `--stage warm` the warm start's
generator, `--stage csd` that stage's EMA); ar_diffusion: the tuned score
network of DIR/dd2/tune as a token-by-token sampler (VAR: scale by scale; 10 Euler steps per
token, dd2.md Table 7).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ddjax.app import build
from ddjax.dd2 import functional as F
from ddjax.dd2 import sampling
from ddjax.dd2.train import latest_step, load_generator
from ddjax.evaluate.report import eval_inputs
from ddjax.evaluate.scoring import score_features
from ddjax.utils.batching import map_batches
from ddjax.utils.images import save_image_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default="configs/llamagen.py", help="its digits preset is used")
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--continuous", action="store_true", help="decode the unsnapped tokens")
    ap.add_argument("--sampler", choices=("one_step", "ar_diffusion"), default="one_step")
    ap.add_argument("--stage", default="", help="one_step from this stage's latest checkpoint "
                    "(warm: the warm start) instead of DIR/dd2/generator")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, a.config))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("digits")
    teacher = build.build_teacher(config)
    cfg, params = load_generator(a.workdir)
    noise, labels = eval_inputs(a.seed, a.num, teacher.seq_len, teacher.code_dim, teacher.num_classes)
    codebook = jnp.asarray(teacher.codebook)
    aux = F.family_aux(teacher)
    stage = "tune" if a.sampler == "ar_diffusion" else a.stage
    if stage:
        ckpts = os.path.join(a.workdir, "dd2", stage, "checkpoints")
        step = latest_step(os.path.dirname(ckpts))
        state = ocp.StandardCheckpointer().restore(os.path.abspath(f"{ckpts}/{step}/default"))
        params = state["params"] if "params" in state else state["gen_ema"]

    def fn(n, lab):
        n, lab = jnp.asarray(n), jnp.asarray(lab)
        if a.sampler == "ar_diffusion":
            q = sampling.ar_diffusion(params, cfg, lab, n, 10, aux)
            return q if a.continuous else codebook[sampling.nearest_code(q, codebook)]
        return sampling.one_step(params, cfg, n, lab, codebook, snap=not a.continuous, aux=aux)

    lat, sec = map_batches(fn, (noise, labels), 250, warmup=a.sampler == "one_step")
    feats = build.extractor(config)
    ref = build.reference(config, teacher.image_size, feats, a.workdir)
    images = teacher.decode_latents(lat)
    r = score_features(feats(save_image_uint8(images)), feats(save_image_uint8(ref)), protocol=feats.protocol)
    ids = np.asarray(sampling.nearest_code(jnp.asarray(lat), codebook))
    r = {k: float(v) for k, v in r.items() if isinstance(v, (int, float, np.floating))}
    r["distinct_tokens_per_image"] = float(np.mean([len(set(x)) for x in ids]))
    r["ms_per_image"] = 1e3 * sec
    print(json.dumps(r))


if __name__ == "__main__":
    main()
