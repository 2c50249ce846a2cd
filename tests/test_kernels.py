"""The fused Pallas kernels (runway_jax.kernels): interpret mode against METHOD's direct
evaluation and the reference twin, lowering for TPU and CUDA from this CPU host, implementation
selection, and the shard_map wrapper on 8 fake CPU devices."""

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from flax import nnx

from method_direct import direct
from runway_jax import attention, kernels
from runway_jax.kernels import layouts, tiling, reference
from test_attention import make_inputs, make_segments

# The 8-row-tile kernels; the Mosaic GPU kernel (64-row tiles, d a multiple of 64, a slow
# interpreter) has its own files: tests/test_kernel_mosaic_gpu*.py.
TARGETS = ("pallas_tpu", "pallas_gpu")
NAMES = ["query", "key", "value", "runway_query", "runway_key"]
SMALL_BLOCKS = tiling.BlockSizes(block_q=8, block_k=8, heads_per_program=2)

# (coefficient, span, batch, T, H, H_kv, d, segments, blocks): together every case of the issue --
# T not a multiple of the block, T = 1, segments, GQA, both spans, both coefficient kinds.
CASES = {
    "exact-bilinear-gqa-segments": ("bilinear", "exact", 2, 19, 2, 1, 8, True, SMALL_BLOCKS),
    "prefix-dot-gqa-segments": ("dot", "prefix", 2, 19, 4, 2, 8, True, SMALL_BLOCKS),
    "exact-dot-unequal-blocks": ("dot", "exact", 1, 21, 2, 2, 8,  False,
                                 tiling.BlockSizes(block_q=16, block_k=8, heads_per_program=1)),
    "prefix-bilinear-T1": ("bilinear", "prefix", 2, 1, 2, 1, 8, False, SMALL_BLOCKS),
}


def interpreted(target):
    """The implementation that runs ``target``'s kernels in Pallas interpret mode."""
    return target + kernels.INTERPRET_SUFFIX


def fused(target, block_sizes, inputs, **options):
    return kernels.rewired_attention(*inputs, implementation=interpreted(target),
                                     block_sizes=block_sizes, scale=None, **options)


def test_gpu_pads_heads_to_a_multiple_of_the_group():
    """3 heads over 1 key/value head in groups of 2 run as 4 heads; the padded head changes
    nothing (forward, all five gradients)."""
    inputs = make_inputs(33, 1, 13, 3, 1, 8)
    options = dict(beta=0.8, runway_coefficient="bilinear", runway_span="exact",
                   segment_ids=make_segments(33, 1, 13))
    got, vjp = jax.vjp(lambda *a: fused("pallas_gpu", SMALL_BLOCKS, a, **options), *inputs)
    want, want_vjp = jax.vjp(lambda *a: direct(*a, **options)[0], *inputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    cotangent = jax.random.normal(jax.random.key(34), got.shape)
    for name, g, w in zip(NAMES, vjp(cotangent), want_vjp(cotangent)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("target", TARGETS)
def test_float32_forward_and_gradients_match_direct_evaluation(target, case):
    """Invariant 4: outputs within 1e-5, gradients of all five inputs within 1e-4."""
    coefficient, span, batch, length, heads, kv_heads, width, segmented, blocks = CASES[case]
    inputs = make_inputs(20, batch, length, heads, kv_heads, width)
    segments = make_segments(20, batch, length) if segmented else None
    options = dict(beta=0.8, runway_coefficient=coefficient, runway_span=span,
                   segment_ids=segments)
    cotangent = jax.random.normal(jax.random.key(21), inputs[0].shape)
    got, vjp = jax.vjp(lambda *a: fused(target, blocks, a, **options), *inputs)
    want, want_vjp = jax.vjp(lambda *a: direct(*a, **options)[0], *inputs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for name, g, w in zip(NAMES, vjp(cotangent), want_vjp(cotangent)):
        assert length == 1 or float(jnp.abs(w).max()) > 1e-3, name
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("target", TARGETS)
def test_kernel_residuals_equal_the_reference_twin(target):
    """The kernels and their jnp twin walk the same tiles: same out, lse, lse^r and u."""
    coefficient, span, batch, length, heads, kv_heads, width, _, blocks = CASES[
        "exact-bilinear-gqa-segments"]
    inputs = make_inputs(22, batch, length, heads, kv_heads, width)
    plan = tiling.plan(length, blocks)
    arrays = layouts.to_kernel_layout(*inputs, make_segments(22, batch, length), plan)
    options = dict(plan=plan, beta=0.8, runway_coefficient=coefficient, runway_span=span,
                   scale=width ** -0.5)
    got = kernels.forward(*arrays, implementation=interpreted(target), block_sizes=blocks,
                          **options)
    want = reference.batched_rewired_forward(*arrays, **options)
    for name, g, w in zip(["out", "lse", "runway_lse", "u"], got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-6, err_msg=name)


def twin_residuals(seed, coefficient, span, blocks=SMALL_BLOCKS, batch=2, length=19, heads=4,
                   kv_heads=2, width=8):
    inputs = make_inputs(seed, batch, length, heads, kv_heads, width)
    plan = tiling.plan(length, blocks)
    arrays = layouts.to_kernel_layout(*inputs, make_segments(seed, batch, length), plan)
    options = dict(plan=plan, beta=0.8, runway_coefficient=coefficient, runway_span=span,
                   scale=width ** -0.5)
    forward = reference.batched_rewired_forward(*arrays, **options)
    out_grad = jax.random.normal(jax.random.key(seed + 1), forward[0].shape)
    out_grad = jnp.where(jnp.arange(plan.padded_length)[:, None] < length, out_grad, 0.0)  # padding
    return inputs, arrays, forward, out_grad, options


@pytest.mark.parametrize("coefficient,span", [("dot", "exact"), ("bilinear", "prefix")])
def test_reference_twin_backward_matches_autodiff_of_direct_evaluation(coefficient, span):
    """The blocked METHOD (3d) backward (the kernels' algorithm) against jax.vjp of (2)-(3)."""
    inputs, arrays, forward, out_grad, options = twin_residuals(31, coefficient, span)
    grads = jax.vmap(lambda *a: reference.rewired_backward(*a, **options))(*arrays, *forward,
                                                                           out_grad)
    segments = arrays[5][:, :19]
    length = inputs[0].shape[1]
    cotangent = layouts.from_kernel_layout(out_grad, length)
    _, vjp = jax.vjp(lambda *a: direct(*a, beta=0.8, runway_coefficient=coefficient,
                                       runway_span=span, segment_ids=segments)[0], *inputs)
    got = [layouts.from_kernel_layout(g, length) for g in grads[:3]] + [g[:, :length] for g in grads[3:5]]
    for name, g, w in zip(NAMES, got, vjp(cotangent)):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("coefficient,span", [("bilinear", "exact"), ("dot", "prefix")])
@pytest.mark.parametrize("target", TARGETS)
def test_backward_kernels_equal_the_reference_twin(target, coefficient, span):
    """Both backward kernels against the blocked twin; the GPU one with two head groups, whose
    atomic adds and split runway terms must sum to the same gradients."""
    inputs, arrays, forward, out_grad, options = twin_residuals(32, coefficient, span)
    want = jax.vmap(lambda *a: reference.rewired_backward(*a, **options))(*arrays, *forward,
                                                                          out_grad)
    if target == "pallas_tpu":
        got = kernels.tpu.backward(*arrays, *forward, out_grad, interpret=True, **options)
    else:
        got = kernels.gpu.backward(*arrays, *forward, out_grad, interpret=True,
                                   block_sizes=SMALL_BLOCKS, **options)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-6, err_msg=f"d{name}")


@pytest.mark.parametrize("span", attention.RUNWAY_SPANS)
def test_reference_twin_matches_dense_reference(span):
    inputs = make_inputs(23, 1, 13, 2, 1, 8)
    segments = make_segments(23, 1, 13)
    plan = tiling.plan(13, tiling.BlockSizes(8, 8))
    arrays = layouts.to_kernel_layout(*inputs, segments, plan)
    out, *_ = reference.batched_rewired_forward(*arrays, plan=plan, beta=1.0,
                                                runway_coefficient="dot", runway_span=span,
                                                scale=8 ** -0.5)
    want = attention.rewired_attention(*inputs, beta=1.0, runway_coefficient="dot",
                                       runway_span=span, segment_ids=segments,
                                       implementation="reference")
    np.testing.assert_allclose(layouts.from_kernel_layout(out, 13), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("coefficient,span", [("bilinear", "exact"), ("dot", "prefix")])
@pytest.mark.parametrize("target", TARGETS)
def test_bfloat16_within_tolerance(target, coefficient, span):
    """Invariant 4 for bfloat16 inputs: output and gradients within 2e-2 of float32 math."""
    inputs = make_inputs(24, 2, 21, 2, 1, 8, dtype=jnp.bfloat16)
    options = dict(beta=1.0, runway_coefficient=coefficient, runway_span=span, segment_ids=None)
    got, vjp = jax.vjp(lambda *a: fused(target, SMALL_BLOCKS, a, **options), *inputs)
    assert got.dtype == jnp.bfloat16
    want, want_vjp = jax.vjp(lambda *a: direct(*a, **options)[0], *inputs)
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=2e-2, rtol=0)
    ones = jnp.ones(got.shape, jnp.float32)
    for name, g, w in zip(NAMES, vjp(ones.astype(jnp.bfloat16)), want_vjp(ones)):
        assert g.dtype == jnp.bfloat16, name
        bound = max(1.0, float(jnp.abs(w).max()))
        np.testing.assert_allclose(g.astype(jnp.float32) / bound, w / bound, atol=2e-2, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("target", TARGETS)
def test_beta_zero_and_causal_attention_are_standard_attention(target):
    """Invariant 1, and causal_attention on the kernels (beta = 0 skips the runway head)."""
    query, key, value, runway_query, runway_key = make_inputs(25, 2, 17, 2, 1, 8)
    segments = make_segments(25, 2, 17)
    want = attention.causal_attention(query, key, value, segment_ids=segments,
                                      implementation="reference")
    causal = attention.causal_attention(query, key, value, segment_ids=segments,
                                        implementation=interpreted(target))
    rewired = attention.rewired_attention(query, key, value, runway_query, runway_key, beta=0.0,
                                          runway_span="prefix", segment_ids=segments,
                                          implementation=interpreted(target))
    np.testing.assert_allclose(causal, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(rewired, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_no_nan_for_extreme_inputs_and_padding_segments(target):
    """Invariant 3: finite outputs and gradients with huge logits and a padding segment."""
    length = 29
    inputs = make_inputs(26, 2, length, 2, 1, 8, spread=60.0)
    segments = jnp.stack([jnp.zeros(length, jnp.int32),
                          jnp.where(jnp.arange(length) < 3, 0, -1).astype(jnp.int32)])
    options = dict(beta=4.0, runway_coefficient="bilinear", runway_span="exact",
                   segment_ids=segments)
    out, vjp = jax.vjp(lambda *a: fused(target, SMALL_BLOCKS, a, **options), *inputs)
    grads = vjp(jnp.ones_like(out))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in [out, *grads])


# --------------------------------------------------------------------------------------------
# Lowering for the real targets from this CPU host, at training shapes.
# --------------------------------------------------------------------------------------------

TRAINING_SHAPES = dict(batch=4, length=4096, heads=16, width=128)
EXPORT_PLATFORMS = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}
# The Triton lowering asks which GPU it compiles for: jax 0.10 falls back to sm_90 by itself,
# jax >= 0.11 reads the abstract mesh's AbstractDevice and raises "No supported GPU devices
# found" without one. An H100 (sm_90) on both lines.
EXPORT_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
TRITON_DEPRECATION = "The Pallas Triton backend is deprecated"


@contextlib.contextmanager
def lowering_without_device(target):
    """Context in which ``target`` lowers for its platform on this CPU host."""
    if target != "pallas_gpu":
        yield
        return
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=EXPORT_GPU)
    with jax.sharding.use_abstract_mesh(mesh), warnings.catch_warnings():
        # jax >= 0.11 warns, attributed to jax, on every Triton lowering; the kernel keeps
        # working while JAX has the backend, and its port to Mosaic GPU is a follow-up issue.
        warnings.filterwarnings("ignore", TRITON_DEPRECATION, DeprecationWarning)
        yield


@pytest.mark.parametrize("span", attention.RUNWAY_SPANS)
@pytest.mark.parametrize("target", TARGETS)
def test_lowers_for_its_platform_forward_and_backward(target, span):
    """``jax.export`` for ``platforms=[tpu]`` / ``[cuda]``, B=4 T=4096 H=16 d=128 bfloat16.

    The Triton custom call is not on jax.export's list of stable custom calls, so its
    compatibility check is disabled (the serialized module is for this JAX version only)."""
    b, t, h, d = (TRAINING_SHAPES[k] for k in ("batch", "length", "heads", "width"))
    shape = jax.ShapeDtypeStruct
    args = [shape((b, t, h, d), jnp.bfloat16)] * 3 + [shape((b, t, d), jnp.bfloat16)] * 2
    segments = shape((b, t), jnp.int32)

    def forward(q, k, v, rq, rk, s):
        return kernels.rewired_attention(q, k, v, rq, rk, implementation=target, beta=1.0,
                                         runway_coefficient="bilinear", runway_span=span,
                                         segment_ids=s, scale=None)

    def loss_gradients(q, k, v, rq, rk, s):  # value_and_grad: the forward kernel is kept
        loss = lambda *a: forward(*a, s).astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=range(5))(q, k, v, rq, rk)

    checks = ([jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
              if target == "pallas_gpu" else [])
    for fn in (forward, loss_gradients):
        with lowering_without_device(target):
            exported = jax.export.export(jax.jit(fn), platforms=[EXPORT_PLATFORMS[target]],
                                         disabled_checks=checks)(*args, segments)
        text = exported.mlir_module()
        assert ("tpu_custom_call" if target == "pallas_tpu" else "xla.gpu.triton") in text
        if fn is loss_gradients:
            assert "rewired_attention_backward_keys" in text


@pytest.mark.parametrize("target", TARGETS)
def test_lowers_with_the_options_of_method_7(target):
    """``jax.export`` for ``[tpu]`` / ``[cuda]`` with a window, a soft cap, 64 queries over 512
    keys with per-row lengths and a traced beta, forward and backward (B=2 H=4 d=64 bfloat16)."""
    shape = jax.ShapeDtypeStruct
    b, tq, tk, h, d = 2, 64, 512, 4, 64
    args = ([shape((b, tq, h, d), jnp.bfloat16)] + [shape((b, tk, h, d), jnp.bfloat16)] * 2
            + [shape((b, tk, d), jnp.bfloat16)] * 2 + [shape((), jnp.float32),
                                                      shape((b,), jnp.int32)])

    def loss_gradients(q, k, v, rq, rk, beta, lengths):
        def loss(*a):
            out = kernels.rewired_attention(
                *a, implementation=target, beta=beta, runway_coefficient="dot",
                runway_span="prefix",
                segment_ids=None, scale=None, local_window_size=100, logits_soft_cap=20.0,
                key_value_seq_lengths=lengths)
            return out.astype(jnp.float32).sum()
        return jax.value_and_grad(loss, argnums=range(5))(q, k, v, rq, rk)

    checks = ([jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
              if target == "pallas_gpu" else [])
    with lowering_without_device(target):
        exported = jax.export.export(jax.jit(loss_gradients), platforms=[EXPORT_PLATFORMS[target]],
                                     disabled_checks=checks)(*args)
    text = exported.mlir_module()
    call = "tpu_custom_call" if target == "pallas_tpu" else "xla.gpu.triton"
    assert text.count(call) >= 4 and "rewired_attention_backward_keys" in text


@pytest.mark.parametrize("target", TARGETS)
def test_every_pallas_call_carries_a_cost_estimate(target):
    """Forward (2) and backward (2) pallas_calls each tell XLA their FLOPs and bytes."""
    import re

    shape = jax.ShapeDtypeStruct
    args = [shape((1, 16, 2, 8), jnp.float32)] * 3 + [shape((1, 16, 8), jnp.float32)] * 2

    def loss(*a):
        return kernels.rewired_attention(*a, implementation=target, beta=1.0,
                                         runway_coefficient="dot",
                                         runway_span="exact", segment_ids=None, scale=None).sum()

    text = str(jax.make_jaxpr(jax.value_and_grad(loss, argnums=range(5)))(*args))
    flops = [int(f) for f in re.findall(r"cost_estimate=CostEstimate\(flops=(\d+)", text)]
    assert text.count("pallas_call[") == len(flops) == 4 and min(flops) > 0


# --------------------------------------------------------------------------------------------
# Implementation selection.
# --------------------------------------------------------------------------------------------


def uses_kernel(fn, *args):
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_default_implementation_per_backend():
    assert attention.default_implementation("tpu") == "pallas_tpu"
    assert attention.default_implementation("gpu") == "pallas_gpu"  # no Hopper GPU here
    assert attention.default_implementation("cuda") == "pallas_gpu"
    assert attention.default_implementation("cpu") == "xla"
    assert attention.default_implementation() == "xla"  # these tests run on CPU


def test_selection_on_cpu():
    inputs = make_inputs(27, 1, 9, 2, 2, 8)
    call = lambda implementation, **kw: functools.partial(
        attention.rewired_attention, implementation=implementation, **kw)
    assert not uses_kernel(call(None), *inputs)  # None on CPU: xla
    # A sequence falls back past kernels that cannot run here ...
    assert not uses_kernel(call(("pallas_tpu", "pallas_gpu", "xla")), *inputs)
    # ... and takes the first that can (the interpret-mode kernels run anywhere).
    assert uses_kernel(call(("pallas_tpu", "pallas_gpu_interpret", "xla")), *inputs)
    assert uses_kernel(call("pallas_tpu_interpret"), *inputs)
    # ALiBi is not in the kernels: None and sequences fall back to xla, a lone name raises.
    slopes = jnp.array([0.5, 0.25])
    assert not uses_kernel(call(("pallas_tpu_interpret", "xla"), alibi_slopes=slopes), *inputs)


def test_implementation_names_agree_between_layers():
    """Every kernel implementation (and its interpret twin) is a name the configs accept."""
    from runway_jax.attention_config import IMPLEMENTATIONS

    assert set(kernels.IMPLEMENTATIONS) <= set(IMPLEMENTATIONS) == set(attention.IMPLEMENTATIONS)
    assert kernels.kernel_of("pallas_gpu_interpret") == ("pallas_gpu", True)
    assert kernels.kernel_of("pallas_tpu") == ("pallas_tpu", False)
    with pytest.raises(ValueError, match="'xla' is not one of"):
        kernels.kernel_of("xla")


def test_interpret_is_not_a_separate_switch():
    """Interpret mode is chosen by the implementation's name only: the public functions have no
    ``interpret`` keyword that could contradict it (or be ignored by the "xla" path)."""
    inputs = make_inputs(27, 1, 9, 2, 2, 8)
    for fn in (attention.rewired_attention, attention.causal_attention):
        with pytest.raises(TypeError, match="interpret"):
            fn(*inputs[:3], implementation="xla", interpret=True)


def test_model_config_takes_a_fallback_order_as_a_comma_separated_string():
    from runway_jax import TransformerLM, model_preset
    from runway_jax.training.cli import parse_flags

    config = parse_flags(["--attention_implementation=pallas_gpu,xla"], "tiny").model
    assert config.attention_config(0).implementations == ("pallas_gpu", "xla")
    tokens = jnp.arange(12).reshape(1, 12) % 50
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    assert not uses_kernel(lambda t: model(t), tokens)  # on CPU the GPU kernel falls back to xla
    want = TransformerLM(config.replace(attention_implementation="xla"), rngs=nnx.Rngs(0))(tokens)
    np.testing.assert_array_equal(model(tokens), want)
    for bad in ("xla,triton", "pallas_gpu,"):
        with pytest.raises(ValueError, match="separated by commas") as error:
            model_preset("tiny", attention_implementation=bad)
        assert "\n" not in str(error.value)


BAD_SELECTIONS = [
    ("needs a TPU", dict(implementation="pallas_tpu")),
    ("needs a GPU", dict(implementation="pallas_gpu")),
    ("implementation='pallas_gpu_interpret'", dict(implementation="pallas_gpu")),
    ("ALiBi", dict(implementation="pallas_tpu_interpret", alibi_slopes=jnp.ones(2))),
    ("none of implementation=('pallas_tpu', 'pallas_gpu')",
     dict(implementation=("pallas_tpu", "pallas_gpu"))),
    ("implementation='triton'", dict(implementation=("pallas_tpu", "triton"))),
]


@pytest.mark.parametrize("needle,kwargs", BAD_SELECTIONS, ids=[n for n, _ in BAD_SELECTIONS])
def test_implementation_that_cannot_run_raises_one_line(needle, kwargs):
    inputs = make_inputs(28, 1, 5, 2, 2, 8)
    with pytest.raises(ValueError) as error:
        attention.rewired_attention(*inputs, **kwargs)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_gpu_kernel_rejects_non_power_of_two_width_and_traced_scale():
    inputs = make_inputs(29, 1, 5, 2, 2, 12)
    with pytest.raises(ValueError, match="power of two"):
        attention.rewired_attention(*inputs, implementation="pallas_gpu_interpret")
    with pytest.raises(ValueError, match="traced scale"):
        jax.jit(lambda s: attention.rewired_attention(
            *inputs, scale=s, implementation="pallas_tpu_interpret"))(0.3)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_q=96), "block_q=96"), (dict(block_k=4), "block_k=4"),
    (dict(heads_per_program=0), "heads_per_program=0"), (dict(num_warps=0), "num_warps=0")])
def test_block_sizes_validate_themselves(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiling.BlockSizes(**kwargs)


@pytest.mark.parametrize("length,expected", [(1, (8, 8, 8)), (19, (32, 32, 32)),
                                              (300, (128, 128, 384)), (4096, (128, 128, 4096))])
def test_plan_shrinks_blocks_and_pads(length, expected):
    plan = tiling.plan(length, tiling.BlockSizes.tpu_default())
    assert (plan.block_q, plan.block_k, plan.padded_length) == expected


# --------------------------------------------------------------------------------------------
# shard_map wrapper: the kernels inside a sharded jit, on 8 fake CPU devices.
# --------------------------------------------------------------------------------------------


def test_kernels_run_sharded_inside_jit_on_eight_devices():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
    inputs = make_inputs(30, 4, 16, 4, 2, 8)
    segments = make_segments(30, 4, 16)
    options = dict(beta=0.8, runway_span="exact", segment_ids=segments)
    want = attention.rewired_attention(*inputs, implementation="reference", **options)
    want_grads = jax.grad(lambda *a: attention.rewired_attention(
        *a, implementation="reference", **options).sum(), argnums=range(5))(*inputs)

    def loss(*a):
        return attention.rewired_attention(*a, implementation="pallas_tpu_interpret",
                                           **options).sum()

    with jax.set_mesh(mesh):
        batch_sharded = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        sharded = [jax.device_put(x, batch_sharded) for x in inputs]
        out = jax.jit(lambda *a: attention.rewired_attention(
            *a, implementation="pallas_tpu_interpret", **options))(*sharded)
        grads = jax.jit(jax.grad(loss, argnums=range(5)))(*sharded)
    assert out.sharding.spec == PartitionSpec(("data", "fsdp"), None, "model")
    assert kernels.sharding.devices_used(mesh, 4, 4, 2) == 8
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    for name, g, w in zip(NAMES, grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"d{name}")


@pytest.mark.slow
def test_training_with_kernel_attention_on_eight_devices(tmp_path):
    """A model configured with attention_implementation="pallas_tpu_interpret" (the TPU kernel in
    interpret mode) trains inside the sharded training jit (data x fsdp x model mesh) and matches
    the xla run."""
    from runway_jax.config import model_preset
    from runway_jax.data import DataConfig
    from runway_jax.training import TrainConfig, train_and_evaluate

    def config(implementation):
        return TrainConfig(
            # 4 rewired heads (5 with the runway head): the model axis (2) splits them.
            model=model_preset("tiny", num_layers=1, features=80, num_heads=5,
                               attention_implementation=implementation),
            data=DataConfig(source="recall", seq_len=16, batch_size=8, recall_pairs=2,
                            recall_queries=2),
            steps=2, log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
            warmup_steps=1, lr=3e-3, mesh_data=2, mesh_fsdp=2, mesh_model=2)

    kernel_run = train_and_evaluate(config("pallas_tpu_interpret"), str(tmp_path / "kernel"),
                                    log=lambda *_: None)
    xla_run = train_and_evaluate(config("xla"), str(tmp_path / "xla"), log=lambda *_: None)
    np.testing.assert_allclose(kernel_run["losses"], xla_run["losses"], atol=1e-4, rtol=0)
