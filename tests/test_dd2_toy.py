"""Proposition 1 on an enumerable teacher (ddjax/dd2/toy.py): CSD training brings the
generator's snapped joint below the total-variation bound that every generator drawing its
positions independently obeys, with the library's CSD and FCS losses and closed-form teacher."""

from __future__ import annotations

import numpy as np

from ddjax.dd2 import toy


def test_the_independent_bound_holds_for_product_distributions():
    joint = toy.toy_joint(0.9)
    bound = toy.independent_tv_bound(0.9)
    rng = np.random.default_rng(0)
    marg = [joint.sum(axis=tuple(j for j in range(3) if j != i)) for i in range(3)]
    candidates = [marg] + [[rng.dirichlet(np.ones(4) * a) for _ in range(3)] for a in (0.3, 1, 10)
                           for _ in range(50)]
    for r in candidates:
        prod = r[0][:, None, None] * r[1][None, :, None] * r[2][None, None, :]
        assert toy.tv(joint, prod) >= bound - 1e-12


def test_csd_gets_the_joint_below_the_independent_bound(optimised_xla):
    joint = toy.toy_joint(0.9)
    gen, hist = toy.train_toy(toy.ToySettings(), joint)
    got = toy.snapped_joint(gen, 100_000)
    tv = toy.tv(joint, got)
    bound = toy.independent_tv_bound(0.9)  # 0.325
    # The same generator with its positions decoupled (its own marginals, drawn independently).
    m = [got.sum(axis=tuple(j for j in range(3) if j != i)) for i in range(3)]
    decoupled = toy.tv(joint, m[0][:, None, None] * m[1][None, :, None] * m[2][None, None, :])
    assert tv < bound - 0.05, (tv, hist)
    assert decoupled >= bound and tv < decoupled - 0.1
    # The coupling itself is learnt: token 2 repeats token 1 far more often than chance (0.25).
    assert sum(got[a, a].sum() for a in range(4)) > 0.6
