"""Training the DD student: overfitting, kill-and-resume, NaN stops (8-device equality:
tests/multidevice/test_sharded_train.py)."""

from __future__ import annotations

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import read_scalars

from ddjax.app import build, run
from ddjax.mapper.pairs import PairDataset
from ddjax.student import losses
from ddjax.student import model as model_lib
from ddjax.student import train as train_lib
from ddjax.student.loading import load_training_run
from ddjax.utils import optim
from ddjax.utils.metrics import summaries_available


def tiny_config(**train):
    import llamagen

    config = llamagen.get_config("tiny,mode=generate")
    config.data.update(num_pairs=64, shard_size=32, batch_size=32)
    config.train.update(**train)
    return config


@pytest.fixture(scope="module")
def pairs16(tmp_path_factory):
    """64 pairs of the tiny preset (4x4 tokens) from the real generate mode."""
    workdir = str(tmp_path_factory.mktemp("pairs16"))
    config = tiny_config()
    run(config, workdir)
    return build.pairs_dir(config, workdir)


def train_config(pairs_dir, **train):
    base = dict(num_steps=20, batch_size=16, log_every=10, checkpoint_every=5, warmup_steps=5, lr=1e-3)
    config = tiny_config(**{**base, **train})
    config.mode = "train"
    config.data.dir = pairs_dir
    return config


def train(config, workdir):
    """The train stage through the entry layer (settings read and checked first)."""
    config.mode = "train"
    return run(config, workdir)


def latest_step(workdir):
    mngr = ocp.CheckpointManager(os.path.join(workdir, "student", "checkpoints"),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    return mngr.latest_step()


# -- pieces ---------------------------------------------------------------------------------
def test_schedule_warmup_cosine_and_weight_decay_mask(tiny_gpt):
    s = optim.lr_schedule(1.0, warmup_steps=4, num_steps=14, min_lr_ratio=0.1)
    np.testing.assert_allclose([float(s(i)) for i in (0, 3, 4, 9, 14, 20)],
                               [0.25, 1.0, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    params = model_lib.init_params(model_lib.dd_config(tiny_gpt[0], 8), jax.random.PRNGKey(0))
    mask = optim.decay_mask(params)
    assert mask["layers_0"]["feed_forward"]["w1"]["kernel"] and mask["output"]["kernel"]
    assert mask["tok_embeddings"]["kernel"] and not mask["tok_embeddings"]["bias"]
    assert not mask["cls_embedding"]["embedding_table"]["embedding"]
    assert not mask["n_d_embed"]["embedding"] and not mask["norm"]["weight"]
    assert not mask["final_layer_conti"]["scale_shift_table"]
    ema = optim.ema_update({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, optim.ema_decay_at(0, 0.99))
    np.testing.assert_allclose(ema["w"], 0.9, atol=1e-6)  # warmup: decay (1 + 0) / (10 + 0)
    assert float(optim.ema_decay_at(10**6, 0.99)) == pytest.approx(0.99)


class LossesTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_losses_are_masked_to_positions_from_t(self):
        code = jnp.eye(4, 3)
        tokens = jnp.array([[0, 1, 2, 3]])
        logits = 10.0 * jax.nn.one_hot(jnp.array([[3, 3, 2, 3]]), 4)  # wrong at positions 0, 1
        cont = code[jnp.array([[1, 1, 2, 3]])]  # wrong at position 0
        terms = self.variant(losses.per_position)(cont, logits, tokens, code)
        chex.assert_shape(list(terms.values()), (1, 4))
        mask = losses.target_mask(jnp.array([2]), 4)
        np.testing.assert_array_equal(mask, [[False, False, True, True]])
        loss, parts = self.variant(functools.partial(losses.dd_loss, ce_weight=1.0, cont_weight=1.0))(
            terms, mask)
        assert float(parts["cont_loss"]) == 0.0 and float(parts["ce"]) < 1e-3
        assert float(losses.masked_mean(terms["acc"], mask)) == 1.0
        assert float(losses.masked_mean(terms["acc"], jnp.ones_like(mask))) == 0.5
        assert float(losses.masked_mean(terms["cont_acc"], jnp.ones_like(mask))) == 0.75

    def test_the_image_loss_is_a_mean_over_images(self):
        terms = {"ce": jnp.zeros((2, 4)), "mse": jnp.ones((2, 4)), "acc": jnp.ones((2, 4)),
                 "cont_acc": jnp.ones((2, 4)), "image": jnp.array([0.2, 0.4])}
        mask = losses.target_mask(jnp.array([1, 3]), 4)
        loss, parts = losses.dd_loss(terms, mask, ce_weight=1.0, cont_weight=2.0, cont_loss="lpips")
        np.testing.assert_allclose([float(parts["cont_loss"]), float(loss)], [0.3, 0.6], rtol=1e-6)
        sums = losses.sums_and_counts(terms, mask, jnp.array([1, 3]), (1, 3))
        np.testing.assert_allclose([float(x) for x in sums["image"]], [0.6, 2.0], rtol=1e-6)


def test_fsdp_spec_shards_the_largest_divisible_dim():
    from jax.sharding import PartitionSpec as P

    assert train_lib.fsdp_spec((64, 192), 4) == P(None, "fsdp")
    assert train_lib.fsdp_spec((192, 64), 4) == P("fsdp", None)
    assert train_lib.fsdp_spec((11, 64), 4) == P(None, "fsdp")
    assert train_lib.fsdp_spec((11, 7), 4) == P()
    assert train_lib.fsdp_spec((64,), 4) == P()


def test_clear_errors(tmp_path):
    config = train_config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--config.mode=generate first"):
        train(config, str(tmp_path))
    config.train.cont_loss = "lpips"
    with pytest.raises(ValueError, match="lpips_weights"):
        train(config, str(tmp_path))
    config.train.update(cont_loss="mse", t_list=(0, 16))
    with pytest.raises(ValueError, match="t_list"):
        train(config, str(tmp_path))
    config.train.update(t_list=(0, 8), batch_size=-5)
    with pytest.raises(ValueError, match="config.train.batch_size=-5"):
        train(config, str(tmp_path))


# -- the loop -------------------------------------------------------------------------------
def test_overfits_64_pairs_at_t0_and_t80(tmp_path, optimised_xla):  # 150 steps: run time dominates
    """10x10 tokens, t_list (0, 80): the logits head reaches >= 99% on 64 pairs at both t."""
    config = tiny_config(t_list=(0, 80), batch_size=16, num_steps=150, lr=1e-2, warmup_steps=10,
                         log_every=50, checkpoint_every=150, ema_decay=0.99)
    config.teacher.model.block_size = 100
    config.teacher.model.multiple_of = 32
    config.data.update(num_pairs=64, shard_size=64, batch_size=64)
    workdir = str(tmp_path)
    run(config, workdir)
    result = train(config, workdir)
    cfg, params, meta = load_training_run(workdir, ema=False)
    pairs = PairDataset(build.pairs_dir(config, workdir)).load_all()
    code = jnp.asarray(build.build_teacher(config).codebook)
    accs = {}
    for t in (0, 80):
        tt = jnp.full((64,), t)
        x_t = model_lib.perturb(code[pairs["tokens"]], tt, jnp.asarray(pairs["noise"]))
        _, logits = model_lib.DDModel(cfg).apply({"params": params}, x_t,
                                                 jnp.asarray(pairs["labels"]), tt)
        accs[t] = float((np.asarray(jnp.argmax(logits, -1)) == pairs["tokens"])[:, t:].mean())
    print(f"overfit accuracy after 150 steps: {accs}; last logged {result['metrics']}")
    assert accs[0] >= 0.99 and accs[80] >= 0.99, accs
    assert meta["step"] == 150 and cfg.block_size == 100 and meta["model_config"]["codebook_dim"] == 8
    # the logged values average the training batches of steps 101-150
    assert result["metrics"]["acc_t80"] >= 0.95 and result["metrics"]["cont_acc_t0"] > 0.5
    for k in ("lr", "l2_grads", "l2_params", "l2_updates", "examples_per_sec", "mse", "ce"):
        assert np.isfinite(result["metrics"][k]), k
    if summaries_available():
        scalars = read_scalars(result["log_dir"])
        assert [s for s, _ in scalars["loss"]] == [50, 100, 150]
        assert scalars["acc_t0"][-1][1] == pytest.approx(result["metrics"]["acc_t0"], rel=1e-6)


def test_crash_and_resume_repeats_the_uninterrupted_run(pairs16, tmp_path, monkeypatch):
    config = train_config(pairs16)
    ref = train(config, str(tmp_path / "ref"))
    assert sorted(ref["losses"]) == list(range(1, 21)) and ref["latest_checkpoint"] == 20

    crashed = str(tmp_path / "crashed")
    batches = PairDataset.batches

    def crash_before_step_14(self, *args, **kwargs):
        for i, batch in enumerate(batches(self, *args, **kwargs)):
            if kwargs["start_step"] + i == 13:
                raise RuntimeError("simulated crash")
            yield batch

    monkeypatch.setattr(PairDataset, "batches", crash_before_step_14)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, crashed)
    monkeypatch.setattr(PairDataset, "batches", batches)
    assert latest_step(crashed) == 10
    resumed = train(config, crashed)
    assert resumed["start_step"] == 10 and sorted(resumed["losses"]) == list(range(11, 21))
    np.testing.assert_allclose([resumed["losses"][s] for s in range(11, 21)],
                               [ref["losses"][s] for s in range(11, 21)], rtol=0, atol=1e-6)
    for ema in (False, True):
        a = load_training_run(str(tmp_path / "ref"), ema=ema)[1]
        b = load_training_run(crashed, ema=ema)[1]
        chex.assert_trees_all_close(a, b, rtol=0, atol=1e-6)
    with open(os.path.join(crashed, "student", "ddjax.json")) as f:
        meta = json.load(f)
    assert meta["kind"] == "dd" and meta["model_config"]["gpt"]["block_size"] == 16


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pairs16, tmp_path, monkeypatch):
    config = train_config(pairs16, log_every=20, checkpoint_every=5)
    batches = PairDataset.batches

    def poison_step_13(self, *args, **kwargs):
        for i, batch in enumerate(batches(self, *args, **kwargs)):
            if kwargs["start_step"] + i == 12:  # the 13th update
                batch = dict(batch, noise=np.full_like(batch["noise"], np.nan))
            yield batch

    monkeypatch.setattr(PairDataset, "batches", poison_step_13)
    with pytest.raises(train_lib.NonFiniteError, match=r"loss = nan at step 13.*stays step 10"):
        train(config, str(tmp_path))
    assert latest_step(str(tmp_path)) == 10  # the check before the step-15 save caught it
    _, params, _ = load_training_run(str(tmp_path), ema=False)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


def test_lpips_continuous_loss_trains_through_the_frozen_decoder(tmp_path):
    """cont_loss="lpips": LPIPS of the VQ-decoded continuous tokens against the decoded target
    codes (16 px images, the smallest LPIPS takes); the image term reaches the continuous head."""
    from conftest import FIXTURES

    from ddjax.evaluate import lpips as lpips_lib
    from ddjax.utils.torch_io import write_state_dict

    vgg = str(tmp_path / "vgg16.safetensors")
    write_state_dict(vgg, lpips_lib.random_vgg_state_dict(0), ())
    lin = os.path.join(FIXTURES, "lpips", "lin_vgg_v0.1.safetensors")

    # ce_weight 0: the LPIPS term is the whole loss, so any gradient reaching the student
    # went through LPIPS and the frozen decoder into the continuous head.
    config = tiny_config(num_steps=2, batch_size=8, log_every=1, checkpoint_every=2, warmup_steps=1,
                         cont_loss="lpips", lpips_weights=vgg, lpips_lin_weights=lin, ce_weight=0.0,
                         weight_decay=0.0, t_list=(0, 32))
    config.teacher.model.block_size = 64  # 8x8 tokens -> 16x16 images
    config.vq.image_size = 16
    config.dd.update(t_list=(0, 32), split_t=64, teacher_start=16, teacher_split_t=64)
    config.data.update(num_pairs=16, shard_size=16, batch_size=16, flow_check_tokens=0)
    run(config, str(tmp_path))
    result = train(config, str(tmp_path))
    first = result["history"][0][1]
    assert np.isfinite(first["image"]) and first["image"] > 0
    assert np.isfinite(first["l2_grads"]) and first["l2_grads"] > 0
    assert np.isfinite(result["metrics"]["loss"])
