r"""Proposition 1 on the enumerable toy teacher (`ddjax.dd2.toy`): CSD's generator joint vs
the teacher's, in total variation after snapping, against the bound every independent-position
generator obeys.

    python experiments/dd2_toy/prop1.py [--steps 1500] [--keep 0.9] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

from ddjax.dd2 import toy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=toy.ToySettings.steps)
    ap.add_argument("--keep", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    joint = toy.toy_joint(a.keep)
    t0 = time.time()
    gen, hist = toy.train_toy(toy.ToySettings(steps=a.steps, seed=a.seed), joint)
    got = toy.snapped_joint(gen)
    marg = got.sum((1, 2))[:, None, None] * got.sum((0, 2))[None, :, None] * got.sum((0, 1))[None, None, :]
    print(json.dumps({"tv_csd": toy.tv(joint, got), "independent_bound": toy.independent_tv_bound(a.keep),
                      "tv_product_of_generator_marginals": toy.tv(joint, marg),
                      "seconds": time.time() - t0, "history": hist}))


if __name__ == "__main__":
    main()
