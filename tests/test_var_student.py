"""The VAR DD student against the official `DD_Model` (fixture tests/fixtures/var/var_dd.npz,
made by make_var_dd_fixtures.py on seeded weights): forward at every timestep, final_predict,
get_final_sequence, 1-/2-step sampling and its images, init_with_teacher, checkpoints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import var_fixtures as vf

from ddjax.convert import api
from ddjax.student.model import final_sequence
from ddjax.student.sampling import StudentApply, sample_dd
from ddjax.student.var_loading import (
    export_var_dd,
    export_var_dd_official,
    load_var_dd,
    var_dd_from_state_dict,
    var_dd_state_dict,
)
from ddjax.student.var_model import (
    VARDDModel,
    final_predict,
    init_from_teacher,
    var_dd_config,
)
from ddjax.teacher.var.family import _decode
from ddjax.utils.torch_io import CheckpointError

ATOL = 1e-4


@pytest.fixture(scope="module")
def case():
    meta = vf.meta()["var_dd"]
    spec = meta["spec"]
    vcfg = vf.vae_cfg(spec["vae"])
    tcfg = vf.var_cfg(spec["var"])
    cfg = var_dd_config(tcfg)
    vae = vf.seeded_vae(meta["vae_shapes"], spec["seed"], vcfg)
    seeded = vf.var_weights.seeded_state_dict(meta["dd_shapes"], spec["seed"] + 1)
    params = var_dd_from_state_dict(seeded, cfg)
    codebook = np.asarray(vae["quantize"]["embedding"]["embedding"], np.float32)
    return dict(meta=meta, spec=spec, cfg=cfg, tcfg=tcfg, vcfg=vcfg, vae=vae, params=params,
                codebook=codebook, a=vf.arrays("var_dd"))


def _close_logits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=ATOL, rtol=0)


def test_state_dict_layout_is_the_official_one(case):
    ours = {k: list(v.shape) for k, v in var_dd_state_dict(case["params"], case["cfg"]).items()}
    want = {k: v[0] for k, v in case["meta"]["state_dict_layout"].items()}
    assert ours == want


def test_forward_and_final_predict_every_timestep(case):
    a, cfg = case["a"], case["cfg"]
    model = VARDDModel(cfg)
    for t, tokens in enumerate(cfg.boundaries):
        tt = np.full((len(a["labels"]),), tokens, np.int32)
        cont, logits = model.apply({"params": case["params"]}, a[f"x_t{t}"], a["labels"], tt)
        np.testing.assert_allclose(cont, a[f"cont_t{t}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(logits, a[f"logits_t{t}"], atol=ATOL, rtol=0)
        fc, fl = final_predict(case["params"], cfg, a[f"x_t{t}"], a["labels"], tt, case["codebook"])
        np.testing.assert_allclose(fc, a[f"final_cont_t{t}"], atol=ATOL, rtol=0)
        _close_logits(fl, a[f"final_logits_t{t}"])


def test_final_sequence_every_split(case):
    a, cfg = case["a"], case["cfg"]
    zeros = np.zeros((len(a["labels"]),), np.int32)
    fc, fl = final_predict(case["params"], cfg, a["x_t0"], a["labels"], zeros, case["codebook"])
    for split, tokens in enumerate(cfg.boundaries):
        np.testing.assert_allclose(final_sequence(fc, fl, case["codebook"], tokens),
                                   a[f"final_seq_split{split}"], atol=ATOL, rtol=0)


def test_one_and_two_step_sampling_and_images(case):
    a, cfg, spec = case["a"], case["cfg"], case["spec"]
    split = cfg.boundaries[spec["split"]]
    for name, t_list in (("1step", [0]), ("2step", spec["t_list_2"])):
        x = sample_dd(StudentApply(cfg), case["params"], a["noise"], a["labels"], case["codebook"],
                      t_list=[cfg.boundaries[t] for t in t_list], split_t=split)
        np.testing.assert_allclose(x, a[f"sample_{name}"], atol=ATOL, rtol=0)
        images = (np.asarray(_decode(case["vae"], x, cfg=case["vcfg"])) + 1) / 2
        np.testing.assert_allclose(images, a[f"image_{name}"], atol=1e-3, rtol=0)


def test_init_from_teacher_matches_the_official_except_its_typo(case):
    meta, spec, a = case["meta"], case["spec"], case["a"]
    teacher = vf.seeded_var(meta["teacher_shapes"], spec["seed"] + 2, case["tcfg"])
    fresh = var_dd_from_state_dict(vf.var_weights.seeded_state_dict(meta["dd_shapes"], spec["seed"] + 3),
                                   case["cfg"])
    ours = var_dd_state_dict(init_from_teacher(fresh, teacher, jax.random.PRNGKey(0)), case["cfg"])
    random_rows = {"lvl_embed.weight": 1, "pos_1LC": 1}
    for key, want in ((k[5:], v) for k, v in a.items() if k.startswith("init.")):
        got = np.asarray(ours[key])
        if key == "n_d_embed.weight":
            continue  # freshly drawn on both sides
        if key == "class_emb.weight":  # official: row 1 re-drawn (a typo for lvl_embed row 1)
            np.testing.assert_array_equal(np.delete(got, 1, 0), np.delete(want, 1, 0))
            t_rows = np.asarray(teacher["class_emb"]["embedding"])
            np.testing.assert_array_equal(got[1], t_rows[1])  # ddjax keeps class 1's trained row
            assert not np.allclose(want[1], t_rows[1])
            continue
        if key in random_rows:
            axis = 0 if key == "lvl_embed.weight" else 1
            r = random_rows[key]
            np.testing.assert_array_equal(np.delete(got, r, axis), np.delete(want, r, axis))
            continue
        if key.startswith(("layerwise_n_d_embed", "final_layer_conti")):  # not touched: fresh
            np.testing.assert_array_equal(got, np.asarray(var_dd_state_dict(fresh, case["cfg"])[key]))
            continue
        np.testing.assert_array_equal(got, want, err_msg=key)


def test_checkpoints_round_trip_and_strict_errors(case, tmp_path):
    torch = pytest.importorskip("torch")
    params, cfg = case["params"], case["cfg"]
    official = export_var_dd_official(params, cfg, str(tmp_path / "var-dd.pth"))
    back = load_var_dd(official, cfg)
    bare = load_var_dd(export_var_dd(params, cfg, str(tmp_path / "dd.safetensors")), cfg)
    for got in (back, bare):
        for x, y in zip(*(sorted(var_dd_state_dict(p, cfg).items()) for p in (params, got)), strict=True):
            np.testing.assert_array_equal(x[1], y[1])
    state = var_dd_state_dict(params, cfg)
    del state["n_d_embed.weight"]
    state["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match=r"(?s)n_d_embed\.weight.*extra\.weight"):
        var_dd_from_state_dict(state, cfg)
    with pytest.raises(CheckpointError, match="trainer.nope"):
        load_var_dd(official, cfg, weights_key="trainer.nope")
    # the converter: .pth (official layout) -> ddjax directory -> .pth, weights unchanged
    d = api.torch_to_jax(official, str(tmp_path / "jax"), "var_dd", cfg)
    again = api.jax_to_torch(d, str(tmp_path / "again.pth"))
    raw = torch.load(again, map_location="cpu", weights_only=True)
    assert sorted(raw["trainer"]) == ["ema_parameters", "var_wo_ddp"]
    for k, v in var_dd_state_dict(params, cfg).items():
        np.testing.assert_array_equal(raw["trainer"]["ema_parameters"][k].numpy(), v)
