"""Compiling for real TPUs from this CPU host: libtpu's compiler behind ``jax.experimental.topologies``.

The fused kernels (forward and both backward passes, METHOD (3c)-(3d)) and the sharded training
step of ``train/compile.py`` go through the real Mosaic/XLA TPU compiler, where VMEM and layout
limits bite that lowering alone never checks. Skipped, with the reason, only when libtpu is not
installed (it is in the dev extra).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import make_single_device_sharding

from runway_jax import kernels
from runway_jax.kernels import cost_model, tiling

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILE = str(ROOT / "train" / "compile.py")

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed, so nothing can be compiled for TPU: pip install -e '.[dev]'")


def run_compile(*flags, prelude=None):
    command = [sys.executable, COMPILE, *flags] if prelude is None else [
        sys.executable, "-c", f"{prelude}; import runpy, sys; sys.argv = {[COMPILE, *flags]!r}; "
        f"runpy.run_path({COMPILE!r}, run_name='__main__')"]
    # Loading libtpu in this process (the kernel test) sets TPU_LIBRARY_PATH; the programs find
    # libtpu by importing it, as on a fresh machine.
    env = {**{k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@needs_libtpu
def test_both_kernel_passes_compile_for_tpu_v5e_with_their_cost_estimates():
    """B=1 T=256 H=4 d=128 bfloat16 on one chip of v5e:2x2: Mosaic accepts the forward (2 kernels)
    and backward (2 more); XLA's FLOPs are the kernels' pl.CostEstimate; nothing is T x T."""
    from runway_jax.training.aot import topology_devices

    device = topology_devices("v5e:2x2")[0]
    assert device.platform == "tpu" and device.device_kind == "TPU v5 lite"
    b, t, h, d = 1, 256, 4, 128
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=make_single_device_sharding(device))
    args = [shape(b, t, h, d)] * 3 + [shape(b, t, d)] * 2

    def forward(q, k, v, rq, rk):
        return kernels.rewired_attention(q, k, v, rq, rk, implementation="pallas_tpu", beta=1.0,
                                         runway_coefficient="bilinear", runway_span="exact",
                                         segment_ids=None, scale=None)

    def loss_gradients(*a):
        return jax.value_and_grad(lambda *x: forward(*x).astype(jnp.float32).sum(), argnums=range(5))(*a)

    from jax.experimental import pallas as pl

    plan = tiling.plan(t, tiling.BlockSizes.tpu_default())
    forward_flops = cost_model.forward_cost(b, t, h, h, d, 2, runway_span="exact")[0]
    backward_flops = sum(cost_model.backward_pass_estimate(pl, b, h, h, d, 2, plan_=plan, runway_span="exact",
                                                       key_pass=key_pass).flops for key_pass in (False, True))
    for fn, calls, flops in ((forward, 2, forward_flops), (loss_gradients, 4, forward_flops + backward_flops)):
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        assert text.count('custom_call_target="tpu_custom_call"') == calls
        if fn is loss_gradients:
            assert "rewired_attention_backward_keys" in text
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # The kernels' estimates, plus the element-wise work around them (layout, masks, loss).
        assert flops <= cost["flops"] < 1.05 * flops
        memory = compiled.memory_analysis()
        assert memory.argument_size_in_bytes == 3 * b * t * h * d * 2 + 2 * b * t * d * 2
        assert 0 < memory.generated_code_size_in_bytes
        assert memory.temp_size_in_bytes < b * h * t * t * 4  # less than one float32 T x T per head


@needs_libtpu
def test_kernels_with_window_soft_cap_ragged_rows_and_traced_beta_compile_for_tpu_v5e():
    """The METHOD (7) options through Mosaic: 256 queries over 1024 keys with per-row lengths
    (scalar prefetch), a window of 200 (a key grid of 4 steps, not 8), a soft cap and beta as a
    runtime SMEM scalar, forward and backward; XLA's FLOPs are the kernels' estimates of the
    tiles that run (fewer than causal attention's)."""
    from jax.experimental import pallas as pl

    from runway_jax.training.aot import topology_devices

    device = topology_devices("v5e:2x2")[0]
    b, tq, tk, h, d, window = 1, 256, 1024, 4, 128, 200
    on_chip = make_single_device_sharding(device)
    shape = lambda dtype, *s: jax.ShapeDtypeStruct(s, dtype, sharding=on_chip)
    args = ([shape(jnp.bfloat16, b, tq, h, d)] + [shape(jnp.bfloat16, b, tk, h, d)] * 2
            + [shape(jnp.bfloat16, b, tk, d)] * 2
            + [shape(jnp.float32), shape(jnp.int32, b)])

    def forward(q, k, v, rq, rk, beta, lengths):
        return kernels.rewired_attention(q, k, v, rq, rk, implementation="pallas_tpu", beta=beta,
                                         runway_coefficient="bilinear", runway_span="exact",
                                         segment_ids=None, scale=None, local_window_size=window,
                                         logits_soft_cap=30.0, key_value_seq_lengths=lengths)

    def loss_gradients(*a):
        return jax.value_and_grad(lambda *x: forward(*x, *a[5:]).astype(jnp.float32).sum(),
                                  argnums=range(5))(*a[:5])

    plan = tiling.plan(tq, tiling.BlockSizes.tpu_default(), key_length=tk, window=window,
                       ragged=True)
    assert (plan.key_steps, plan.num_key_blocks) == (4, 8)
    forward_flops = cost_model.forward_cost(b, tk, h, h, d, 2, runway_span="exact", window=window,
                                        query_length=tq, soft_cap=True)[0]
    assert forward_flops < cost_model.forward_cost(b, tk, h, h, d, 2, runway_span="exact",
                                               query_length=tq)[0]
    backward_flops = sum(cost_model.backward_pass_estimate(
        pl, b, h, h, d, 2, plan_=plan, runway_span="exact", key_pass=key_pass, soft_cap=True).flops
        for key_pass in (False, True))
    for fn, calls, flops in ((forward, 2, forward_flops),
                             (loss_gradients, 4, forward_flops + backward_flops)):
        compiled = jax.jit(fn).lower(*args).compile()
        text = compiled.as_text()
        assert text.count('custom_call_target="tpu_custom_call"') == calls
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        assert flops <= cost["flops"] < 1.05 * flops


@needs_libtpu
def test_train_compile_tiny_on_v5e_2x2_prints_memory_and_flops(tmp_path):
    out = tmp_path / "report.json"
    result = run_compile("--preset=tiny", "--topology=v5e:2x2", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    for needle in ("train_step per device: arguments", "temporaries", "peak", "FLOP",
                   "eval_step per device", "compiled in", "fits"):
        assert needle in result.stdout
    report = json.loads(out.read_text())
    assert report["num_devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "model": 1}
    assert report["attention_implementation"] == "pallas_tpu"
    step = report["train_step"]
    # 2 layers: forward 2 kernels, backward 2 kernels, each (the eval step: forward only).
    assert step["tpu_custom_calls"] == 8 and report["eval_step"]["tpu_custom_calls"] == 4
    assert step["flops"] > report["eval_step"]["flops"] > 0
    # Within a factor 2 of the analytic 6 N + 12 L T D per device (the kernels count runway work).
    assert 0.5 < step["flops"] / step["analytic_flops"] < 2
    assert step["aliased_bytes"] > 0  # the donated state is reused for the new one
    assert report["fits"] is True and step["peak_bytes"] < report["hbm_per_device_bytes"] == 16 * 2**30


@needs_libtpu
@pytest.mark.parametrize("flags, message", [
    (("--topology=v5e:2x2", "--mesh_fsdp=3"), "does not match the 4 devices"),
    (("--topology=v9z:2x2",), "is not a TPU topology libtpu knows"),
])
def test_train_compile_one_line_errors(flags, message):
    result = run_compile("--preset=tiny", *flags)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_train_compile_without_libtpu_says_how_to_install_it():
    # sys.modules[name] = None makes `import libtpu` fail, as on a machine without the extra.
    result = run_compile("--preset=tiny", "--topology=v5e:2x2", prelude="import sys; sys.modules['libtpu'] = None")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: compiling for a TPU topology needs libtpu, which is not installed: "
        "install the tpu extra: pip install -e '.[tpu]'"]
