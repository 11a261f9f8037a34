"""Pallas attention kernels against the XLA reference, the dispatcher, and the teacher on top.

`FlashAttentionTest` / `DecodeAttentionTest` run the compiled kernels and skip without a GPU or
TPU; their `...InterpretTest` subclasses run the same cases through the Pallas interpreter on
the CPU, with shapes small enough for it. `...LoweringTest` lowers the kernels for CUDA (Triton)
and TPU (Mosaic) from the CPU host: that checks the BlockSpecs and the primitives the kernels
use against both backends' Pallas lowerings, though not the final Triton/Mosaic compilation.
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ddjax.kernels.attention import (
    attention,
    attention_reference,
    available_implementations,
    default_implementation,
    kv_cache_layout,
)
from ddjax.kernels.decode_attention import BlockSizes as DecodeBlockSizes
from ddjax.kernels.decode_attention import decode_attention, decode_attention_reference
from ddjax.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
)

ON_ACCELERATOR = jax.default_backend() in ("gpu", "tpu")
F32_OUT = dict(atol=1e-5, rtol=1e-5)
F32_GRAD = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=3e-2, rtol=3e-2)


class _KernelTestCase(parameterized.TestCase):
    """Device tests skip without a GPU/TPU; INTERPRET = True runs them on the CPU."""

    INTERPRET = False

    def setUp(self):
        super().setUp()
        if not self.INTERPRET and not ON_ACCELERATOR:
            self.skipTest("needs a GPU or TPU (the InterpretTest subclass runs on the CPU)")

    @contextlib.contextmanager
    def skip_if_out_of_memory(self):
        try:
            yield
        except Exception as e:  # the runtime error type moved between jax versions
            if "RESOURCE_EXHAUSTED" in str(e):
                self.skipTest(f"out of device memory: {e}")
            raise


def _qkv(b, t, s, h, hkv, d, dtype=jnp.float32, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (
        jax.random.normal(kq, (b, t, h, d), dtype),
        jax.random.normal(kk, (b, s, hkv, d), dtype),
        jax.random.normal(kv, (b, s, hkv, d), dtype),
        jax.random.normal(kg, (b, t, h, d), jnp.float32),  # output cotangent
    )


def _reference_with_grads(q, k, v, do, q_offset, causal):
    def loss(q, k, v):
        return jnp.sum(flash_attention_reference(q, k, v, q_offset, causal=causal) * do)

    with jax.default_matmul_precision("float32"):  # TPUs default to bf16 passes, GPUs to TF32
        out = jax.jit(flash_attention_reference, static_argnames="causal")(
            q, k, v, q_offset, causal=causal
        )
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return out, grads


# (b, t, s, h, hkv, d, q_offset, causal, block sizes)
FLASH_CASES = {
    "gqa_padded": (2, 40, 40, 4, 2, 16, 0, True, BlockSizes(16, 16)),
    "len257_batch1": (1, 257, 257, 1, 1, 16, 0, True, BlockSizes(64, 64)),
    "prefix_mqa": (1, 24, 40, 4, 1, 16, 16, True, BlockSizes(16, 32, 32, 16)),
    "non_causal_mha": (2, 33, 33, 2, 2, 32, 0, False, BlockSizes(32, 16)),
}


class FlashAttentionTest(_KernelTestCase):
    """Compiled kernels (GPU: Triton, TPU: Mosaic); skipped on the CPU."""

    def _flash(self, q, k, v, q_offset, **kw):
        return flash_attention(q, k, v, q_offset, interpret=self.INTERPRET, **kw)

    @parameterized.named_parameters((name, name) for name in FLASH_CASES)
    def test_forward_and_grads_match_reference(self, case):
        b, t, s, h, hkv, d, q_offset, causal, sizes = FLASH_CASES[case]
        q, k, v, do = _qkv(b, t, s, h, hkv, d)

        @jax.jit
        def run(q, k, v):
            out, vjp = jax.vjp(
                lambda q, k, v: self._flash(q, k, v, q_offset, causal=causal, block_sizes=sizes),
                q, k, v,
            )
            return out, vjp(do)

        with self.skip_if_out_of_memory():
            out, grads = run(q, k, v)
            out2, grads2 = run(q, k, v)
        ref_out, ref_grads = _reference_with_grads(q, k, v, do, q_offset, causal)
        np.testing.assert_allclose(out, ref_out, **F32_OUT)
        for name, g, ref in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
            assert g.shape == ref.shape, name
            np.testing.assert_allclose(g, ref, **F32_GRAD, err_msg=name)
        # Deterministic: no atomics, fixed loop order.
        np.testing.assert_array_equal(out, out2)
        for g, g2 in zip(grads, grads2, strict=True):
            np.testing.assert_array_equal(g, g2)

    def test_traced_offset(self):
        """A few new queries after a prefix whose length is only known at run time."""
        q, k, v, _ = _qkv(1, 8, 48, 4, 2, 16)
        run = jax.jit(lambda off: self._flash(q, k, v, off, block_sizes=BlockSizes(16, 16)))
        with jax.default_matmul_precision("float32"):
            reference = jax.jit(lambda off: attention_reference(q, k, v, q_offset=off))
        for off in (0, 7, 40):
            with self.skip_if_out_of_memory():
                out = run(jnp.int32(off))
            with jax.default_matmul_precision("float32"):
                ref = reference(jnp.int32(off))
            np.testing.assert_allclose(out, ref, **F32_OUT, err_msg=f"q_offset={off}")

    def test_bfloat16_forward(self):
        q, k, v, _ = _qkv(2, 40, 40, 4, 2, 16, dtype=jnp.bfloat16)
        with self.skip_if_out_of_memory():
            out = self._flash(q, k, v, 0, block_sizes=BlockSizes(16, 16))
        assert out.dtype == jnp.bfloat16
        ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)))
        np.testing.assert_allclose(out.astype(jnp.float32), ref, **BF16)


class FlashAttentionInterpretTest(FlashAttentionTest):
    INTERPRET = True

    def test_tpu_layout(self):
        """The head-major TPU configuration (SMEM offset, [B, H, S, D] tiles), interpreted."""
        q, k, v, do = _qkv(2, 40, 40, 4, 2, 16)
        fn = lambda q, k, v: flash_attention(
            q, k, v, 3, block_sizes=BlockSizes(16, 16), interpret=True, platform="tpu"
        )
        out, vjp = jax.vjp(fn, q, k, v)
        ref_out, ref_grads = _reference_with_grads(q, k, v, do, 3, True)
        np.testing.assert_allclose(out, ref_out, **F32_OUT)
        for g, ref in zip(vjp(do), ref_grads, strict=True):
            np.testing.assert_allclose(g, ref, **F32_GRAD)


# (b, s, h, hkv, d, causal, offsets, block sizes)
DECODE_CASES = {
    "gqa_unaligned_cache": (2, 40, 4, 2, 16, True, (0, 15, 16, 39), DecodeBlockSizes(16)),
    "mqa_len257": (1, 257, 4, 1, 16, True, (0, 128, 256), DecodeBlockSizes(64)),
    "mha_non_causal": (2, 33, 2, 2, 32, False, (5,), DecodeBlockSizes(16)),
}


class DecodeAttentionTest(_KernelTestCase):
    """Compiled decode kernel; skipped on the CPU."""

    @parameterized.named_parameters((name, name) for name in DECODE_CASES)
    def test_matches_reference(self, case):
        b, s, h, hkv, d, causal, offsets, sizes = DECODE_CASES[case]
        q, k, v, _ = _qkv(b, 1, s, h, hkv, d)
        run = jax.jit(lambda off: decode_attention(
            q, k, v, off, causal=causal, block_sizes=sizes, interpret=self.INTERPRET
        ))
        for off in offsets:
            with self.skip_if_out_of_memory():
                out = run(jnp.int32(off))
                again = run(jnp.int32(off))
            with jax.default_matmul_precision("float32"):
                ref = decode_attention_reference(q, k, v, off, causal=causal)
            np.testing.assert_allclose(out, ref, **F32_OUT, err_msg=f"q_offset={off}")
            np.testing.assert_array_equal(out, again)

    def test_bfloat16(self):
        q, k, v, _ = _qkv(2, 1, 40, 4, 2, 16, dtype=jnp.bfloat16)
        with self.skip_if_out_of_memory():
            out = decode_attention(q, k, v, 20, block_sizes=DecodeBlockSizes(16),
                                   interpret=self.INTERPRET)
        assert out.dtype == jnp.bfloat16
        ref = attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), q_offset=20)
        np.testing.assert_allclose(out.astype(jnp.float32), ref, **BF16)


class DecodeAttentionInterpretTest(DecodeAttentionTest):
    INTERPRET = True

    def test_tpu_layout(self):
        q, k, v, _ = _qkv(2, 1, 40, 4, 2, 16)
        out = decode_attention(q, k, v, 17, block_sizes=DecodeBlockSizes(16), interpret=True,
                               platform="tpu")
        np.testing.assert_allclose(out, decode_attention_reference(q, k, v, 17), **F32_OUT)


class KernelLoweringTest(parameterized.TestCase):
    """Lowers forward + backward and decode for another backend, from whatever host runs this."""

    @parameterized.parameters("cuda", "tpu")
    def test_flash_forward_and_backward_lower(self, lowering_platform):
        platform = "gpu" if lowering_platform == "cuda" else "tpu"
        q, k, v, _ = _qkv(2, 257, 257, 4, 2, 64, dtype=jnp.bfloat16)

        def loss(q, k, v, off):
            out = flash_attention(q, k, v, off, interpret=False, platform=platform)
            return jnp.sum(out.astype(jnp.float32))

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = fn.trace(q, k, v, jnp.int32(1)).lower(lowering_platforms=(lowering_platform,))
        assert text.as_text().count("custom_call") >= 3  # forward, dq, dkv kernels

    @parameterized.parameters("cuda", "tpu")
    def test_decode_lowers(self, lowering_platform):
        platform = "gpu" if lowering_platform == "cuda" else "tpu"
        q, k, v, _ = _qkv(2, 1, 257, 12, 12, 64)  # float32: the IEEE-precision dot path
        fn = jax.jit(lambda q, k, v, off: decode_attention(
            q, k, v, off, interpret=False, platform=platform
        ))
        text = fn.trace(q, k, v, jnp.int32(9)).lower(lowering_platforms=(lowering_platform,))
        assert "custom_call" in text.as_text()


class TestDispatcher:
    def test_unknown_implementation(self):
        q, k, v, _ = _qkv(1, 4, 4, 2, 2, 16)
        with pytest.raises(ValueError, match=r"unknown attention implementation 'flash'.*'xla'"):
            attention(q, k, v, implementation="flash")

    @pytest.mark.skipif(jax.default_backend() == "gpu", reason="cudnn exists on GPU")
    def test_cudnn_off_gpu_names_the_alternatives(self):
        q, k, v, _ = _qkv(1, 4, 4, 2, 2, 16)
        with pytest.raises(ValueError, match=r"'cudnn' is not available .*\('xla', 'pallas'\)"):
            attention(q, k, v, implementation="cudnn")

    def test_default_choice_per_backend(self):
        f32 = jnp.zeros((1, 4, 2, 64), jnp.float32)
        bf16 = f32.astype(jnp.bfloat16)
        assert default_implementation(bf16, "gpu") == "xla"  # opt-in until verified on a device
        os.environ["DDJAX_ATTENTION_AUTO"] = "1"
        try:
            self._auto_choices(f32, bf16)
        finally:
            del os.environ["DDJAX_ATTENTION_AUTO"]

    def _auto_choices(self, f32, bf16):
        assert default_implementation(f32, "cpu") == "xla"
        assert default_implementation(bf16, "tpu") == "pallas"
        assert default_implementation(bf16, "gpu") == "cudnn"
        assert default_implementation(f32, "gpu") == "pallas"
        assert default_implementation(jnp.zeros((1, 4, 2, 24)), "gpu") == "xla"
        assert available_implementations("gpu") == ("xla", "cudnn", "pallas")
        assert "cudnn" not in available_implementations("tpu")

    def test_invalid_kernel_configs(self):
        with pytest.raises(ValueError, match="power of two"):
            BlockSizes(block_q=24)
        q, k, v, _ = _qkv(1, 4, 4, 2, 2, 24)
        with pytest.raises(ValueError, match="head dim must be a power of two"):
            flash_attention(q, k, v, platform="gpu", interpret=True)
        with pytest.raises(ValueError, match="one query per sequence"):
            decode_attention(q, k, v, 0, interpret=True)

    def test_default_runs_the_reference_on_cpu(self):
        if jax.default_backend() != "cpu":
            pytest.skip("the CPU default")
        q, k, v, _ = _qkv(1, 6, 6, 4, 2, 16)
        np.testing.assert_array_equal(attention(q, k, v), attention_reference(q, k, v))

    @pytest.mark.parametrize("impl", ["xla", "pallas"])
    @pytest.mark.parametrize("t", [1, 3])
    def test_head_major_keys_equal_sequence_major(self, impl, t):
        """kv_layout="bhsd" takes k, v as [B, Hkv, S, D]: the same attention (GQA, an offset)."""
        q, k, v, _ = _qkv(2, t, 24, 4, 2, 16)
        kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        with jax.default_matmul_precision("float32"):
            ref = attention_reference(q, k, v, q_offset=9)
            out = attention(q, kh, vh, q_offset=9, implementation=impl, kv_layout="bhsd")
        np.testing.assert_allclose(out, ref, **F32_OUT)
        with pytest.raises(ValueError, match="kv_layout must be one of"):
            attention(q, k, v, implementation=impl, kv_layout="bsdh")

    def test_cache_layout_follows_the_implementation(self):
        q = jnp.zeros((1, 1, 4, 64), jnp.float32)
        assert kv_cache_layout("xla", q) == "bhsd"
        assert kv_cache_layout("pallas", q) == "bshd"
        assert kv_cache_layout(None, q, "cpu") == "bhsd"
        from ddjax.teacher.llamagen.gpt import gpt_config, init_cache

        shapes = {impl: init_cache(gpt_config("GPT-B", n_layer=1, dim=64, n_head=4, n_kv_head=2,
                                              block_size=16, attention_impl=impl), 3)[0]["k"].shape
                  for impl in ("xla", "pallas")}
        assert shapes == {"xla": (3, 2, 17, 16), "pallas": (3, 17, 2, 16)}

    @pytest.mark.parametrize("t", [1, 5])
    def test_pallas_through_dispatcher_with_mesh(self, t):
        """T == 1 takes the decode kernel, T > 1 flash; both under shard_map over the batch."""
        n = min(jax.device_count(), 2)
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
        q, k, v, _ = _qkv(2, t, 24, 4, 2, 16)
        out = jax.jit(lambda q, k, v, off: attention(
            q, k, v, q_offset=off, implementation="pallas", mesh=mesh
        ))(q, k, v, jnp.int32(7))
        with jax.default_matmul_precision("float32"):
            ref = attention_reference(q, k, v, q_offset=7)
        np.testing.assert_allclose(out, ref, **F32_OUT)


def test_teacher_gpt_pallas_matches_xla():
    """The LlamaGen teacher with attention_impl='pallas' vs 'xla': teacher forcing and the cache."""
    from ddjax.teacher.llamagen.gpt import GPT, gpt_config, init_cache, init_params

    def model(impl):
        return GPT(gpt_config("GPT-B", n_layer=1, dim=64, n_head=4, n_kv_head=2, vocab_size=32,
                              block_size=16, num_classes=10, attention_impl=impl))

    xla, pallas = model("xla"), model("pallas")
    params = init_params(xla.config, jax.random.PRNGKey(0))
    # The output head starts at zero; random weights everywhere make the logits informative.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(treedef, [
        x + 0.1 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys)
    ])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 32)
    labels = jnp.array([3, 7])
    cls = xla.config.cls_token_num

    def teacher_forcing(m):
        return jax.jit(lambda p: m.apply({"params": p}, tokens, labels))(params)

    def cached(m):
        @jax.jit
        def run(p):
            caches = init_cache(m.config, tokens.shape[0])
            first, caches = m.apply({"params": p}, labels, caches, method=GPT.prefill)

            def step(caches, i):
                tok = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
                logits, caches = m.apply({"params": p}, tok, caches, cls + i, method=GPT.decode)
                return caches, logits[:, 0]

            _, rest = jax.lax.scan(step, caches, jnp.arange(tokens.shape[1] - 1))
            return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1)

        return run(params)

    with jax.default_matmul_precision("float32"):
        tf_xla, tf_pallas = teacher_forcing(xla), teacher_forcing(pallas)
        cache_xla, cache_pallas = cached(xla), cached(pallas)
    assert float(jnp.std(tf_xla)) > 1e-2  # not trivially zero
    np.testing.assert_allclose(tf_pallas, tf_xla, **F32_OUT)
    np.testing.assert_allclose(cache_pallas, cache_xla, **F32_OUT)
    np.testing.assert_allclose(cache_pallas, tf_pallas, atol=1e-4, rtol=1e-4)
