"""A user's Gemma-style model swaps its attention for ours with one call per layer (issue 15).

The client below is written the way a user's Flax model is, independently of runway_jax's own
model: local layers with a sliding window and global layers, grouped-query attention (4 query
heads over 2 key/value heads), RoPE, a ``query_pre_attn_scalar`` logit scale, Gemma 2's attention
logit soft-capping, left-padded prompts, float32 and bfloat16. Its attention is one function,
``attend``, so the same weights run with

* Gemma's own attention (``jax.nn.dot_product_attention`` with its ``mask`` and
  ``local_window_size``, or the einsum + ``tanh`` soft cap that Gemma writes by hand), and
* runway_jax's ``rewired_attention`` (one call per layer): query head H-1 is re-purposed as the
  runway head and reads its key from its own group's key head, so K/V are neither expanded nor
  added to and the checkpoint's weights are used as they are. With ``beta = 0`` that is exactly
  the original model (METHOD invariant 1); with ``beta > 0`` it is METHOD (3) with the options of
  (7), checked against the spec evaluated term by term in float64 and against autodiff of its
  direct evaluation.

The client then trains a few steps and decodes through :mod:`runway_jax.cache` (prefill in one
pass, then token by token), which reproduces its full forward pass (invariant 8).

Left padding is expressed as boolean segment ids (pad tokens are segment False), which every
implementation, the kernels included, takes; a ``mask`` works the same way on the paths that
take one (tests/test_attention_options.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from method_direct import direct_options, spec_loop
from runway_jax import attention
from runway_jax import cache as kv_cache

VOCAB, FEATURES, HEADS, KV_HEADS, WIDTH, MLP = 32, 32, 4, 2, 8, 64
WINDOW = 3  # local layers see the query and the 3 keys before it
LAYER_WINDOWS = (WINDOW, None)  # Gemma 2 alternates local and global layers
SOFT_CAP = 20.0  # Gemma 2's attn_logits_soft_cap is 50; smaller here so that the cap matters
FINAL_SOFT_CAP = 30.0
QUERY_PRE_ATTN_SCALAR = 12.0  # Gemma's logit scale is query_pre_attn_scalar ** -0.5, not d ** -0.5
PAD = 0
KERNELS = ("pallas_tpu_interpret", "pallas_gpu_interpret")  # interpret mode on CPU


def rope(x, positions, base=10_000.0):
    """The client's own RoPE (half-split), ``x`` ``[B, T, N, d]``."""
    half = x.shape[-1] // 2
    frequencies = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * frequencies  # [B, T, 1, d/2]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin],
                           axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features):
        self.scale = nnx.Param(jnp.zeros((features,)))

    def __call__(self, x):
        variance = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * jax.lax.rsqrt(variance + 1e-6) * (1 + self.scale[...])).astype(x.dtype)


class Block(nnx.Module):
    def __init__(self, window, rngs, dtype):
        linear = functools.partial(nnx.Linear, use_bias=False, rngs=rngs, dtype=dtype)
        self.window = window
        self.query = linear(FEATURES, HEADS * WIDTH)
        self.key = linear(FEATURES, KV_HEADS * WIDTH)
        self.value = linear(FEATURES, KV_HEADS * WIDTH)
        self.out = linear(HEADS * WIDTH, FEATURES)
        self.attention_norm, self.mlp_norm = RMSNorm(FEATURES), RMSNorm(FEATURES)
        self.gate, self.up = linear(FEATURES, MLP), linear(FEATURES, MLP)
        self.down = linear(MLP, FEATURES)

    def __call__(self, x, positions, attend):
        batch, length, _ = x.shape
        h = self.attention_norm(x)
        q = rope(self.query(h).reshape(batch, length, HEADS, WIDTH), positions)
        k = rope(self.key(h).reshape(batch, length, KV_HEADS, WIDTH), positions)
        v = self.value(h).reshape(batch, length, KV_HEADS, WIDTH)
        o = attend(q, k, v, window=self.window)  # [B, T, H, d]: the one call that is swapped
        x = x + self.out(o.reshape(batch, length, HEADS * WIDTH))
        h = self.mlp_norm(x)
        return x + self.down(jax.nn.gelu(self.gate(h)) * self.up(h))


class GemmaStyleLM(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.embed = nnx.Embed(VOCAB, FEATURES, rngs=rngs, dtype=dtype)
        self.blocks = nnx.List([Block(w, rngs, dtype) for w in LAYER_WINDOWS])
        self.norm = RMSNorm(FEATURES)

    def __call__(self, tokens, positions, attend):
        """``attend(q, k, v, *, window, layer)``; logits ``[B, T, VOCAB]`` (float32)."""
        x = self.embed(tokens) * jnp.sqrt(float(FEATURES)).astype(self.embed.embedding.dtype)
        for layer, block in enumerate(self.blocks):
            x = block(x, positions, functools.partial(attend, layer=layer))
        logits = self.embed.attend(self.norm(x)).astype(jnp.float32)
        return FINAL_SOFT_CAP * jnp.tanh(logits / FINAL_SOFT_CAP)


# ---- the attention functions the client can plug in ----------------------------------------


def gemma_attention(q, k, v, *, window, layer, segment_ids, soft_cap):
    """The original model's attention: jax.nn.dot_product_attention, or (it has no soft cap) the
    einsum-and-tanh form Gemma 2 writes by hand."""
    del layer
    scale = QUERY_PRE_ATTN_SCALAR ** -0.5
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    if soft_cap is None:
        return jax.nn.dot_product_attention(
            q, k, v, mask=same_segment[:, None], scale=scale, is_causal=True,
            local_window_size=None if window is None else (window, 0))
    groups = HEADS // KV_HEADS
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = soft_cap * jnp.tanh(logits / soft_cap)
    i, j = jnp.arange(q.shape[1])[:, None], jnp.arange(k.shape[1])[None]
    visible = (j <= i) & (True if window is None else i - j <= window) & same_segment[:, None]
    probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
    return jnp.einsum("bhij,bjhd->bihd", probs, v.astype(jnp.float32)).astype(q.dtype)


def runway_call_arguments(q, k):
    """Query head H-1 is the runway head; its key is its own group's key head (no new weights)."""
    return q[:, :, -1], k[:, :, -1]


def runway_attention(q, k, v, *, window, layer, segment_ids, soft_cap, beta, implementation):
    """The swap: one call of the library per layer."""
    del layer
    runway_query, runway_key = runway_call_arguments(q, k)
    return attention.rewired_attention(
        q, k, v, runway_query, runway_key, beta=beta, segment_ids=segment_ids,
        local_window_size=window, logits_soft_cap=soft_cap, scale=QUERY_PRE_ATTN_SCALAR ** -0.5,
        implementation=implementation)


def spec_attention(q, k, v, *, window, layer, segment_ids, soft_cap, beta, differentiable):
    """The spec: METHOD (3) with (7), term by term in float64 (forward), or its jnp twin (for
    autodiff)."""
    del layer
    options = dict(beta=beta, runway_coefficient="bilinear", runway_span="exact",
                   segment_ids=segment_ids, local_window_size=window, logits_soft_cap=soft_cap,
                   scale=QUERY_PRE_ATTN_SCALAR ** -0.5)
    runway_query, runway_key = runway_call_arguments(q, k)
    if differentiable:
        return direct_options(q, k, v, runway_query, runway_key, **options)[0].astype(q.dtype)

    def loop(*arrays):
        return spec_loop(*arrays, **options)[0].astype(np.float32)

    shape = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.pure_callback(loop, shape, q, k, v, runway_query, runway_key).astype(q.dtype)


# ---- data -------------------------------------------------------------------------------


def left_padded_prompts(seed, batch=3, length=12):
    """Rows of different lengths, padded on the left as Gemma's sampler does; segment ids are
    True on real tokens, positions count real tokens from 0."""
    rng = np.random.default_rng(seed)
    lengths = np.array([length, length - 4, length - 7])[:batch]
    tokens = np.full((batch, length), PAD, np.int32)
    for row, real in enumerate(lengths):
        tokens[row, length - real:] = rng.integers(1, VOCAB, real)
    real = tokens != PAD
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0)
    return jnp.asarray(tokens), jnp.asarray(real), jnp.asarray(positions)


def model(seed=0, dtype=jnp.float32):
    return GemmaStyleLM(nnx.Rngs(seed), dtype=dtype)


def logits_and_grads(client, tokens, positions, attend, real):
    """Logits and the gradient of a loss over the real tokens' logits, w.r.t. every weight."""
    cotangent = jax.random.normal(jax.random.key(7), tokens.shape + (VOCAB,))
    graph, params = nnx.split(client)

    def loss(params):
        logits = nnx.merge(graph, params)(tokens, positions, attend)
        return jnp.sum(jnp.where(real[..., None], logits * cotangent, 0.0)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads


def assert_real_rows_close(got, want, real, atol, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got[np.asarray(real)], want[np.asarray(real)], atol=atol, rtol=0,
                               err_msg=what)


def assert_grads_close(got, want, atol):
    for (path, g), (_, w) in zip(jax.tree_util.tree_leaves_with_path(got),
                                 jax.tree_util.tree_leaves_with_path(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


IMPLEMENTATIONS = ("reference", "xla", *KERNELS)


# ---- tests ------------------------------------------------------------------------------


# The kernels' soft cap is checked by the beta > 0 test below (every layer there is capped).
@pytest.mark.parametrize("implementation,soft_cap", [
    *[(implementation, None) for implementation in IMPLEMENTATIONS],
    ("reference", SOFT_CAP), ("xla", SOFT_CAP)])
def test_beta_zero_is_the_original_model(implementation, soft_cap):
    """Invariant 1 in a user's model: with beta = 0 the swapped model gives the original's logits
    and gradients (jax.nn.dot_product_attention with mask and local_window_size; Gemma's own
    soft-capped attention), with GQA, windows and left padding."""
    tokens, real, positions = left_padded_prompts(1)
    client = model()
    ours = functools.partial(runway_attention, segment_ids=real, soft_cap=soft_cap, beta=0.0,
                             implementation=implementation)
    theirs = functools.partial(gemma_attention, segment_ids=real, soft_cap=soft_cap)
    got, got_grads = logits_and_grads(client, tokens, positions, ours, real)
    want, want_grads = logits_and_grads(client, tokens, positions, theirs, real)
    assert_real_rows_close(got, want, real, 1e-5, "logits")
    assert_grads_close(got_grads, want_grads, 1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rewired_model_follows_the_spec(implementation):
    """beta > 0: the model's logits equal the same model with METHOD (3)/(7) evaluated term by
    term in float64 (window, soft cap, GQA, left padding, a non-default scale), and its weight
    gradients equal autodiff of the spec's direct evaluation."""
    tokens, real, positions = left_padded_prompts(2)
    client = model(1)
    common = dict(segment_ids=real, soft_cap=SOFT_CAP, beta=0.8)
    ours = functools.partial(runway_attention, implementation=implementation, **common)
    spec = functools.partial(spec_attention, differentiable=False, **common)
    got, got_grads = logits_and_grads(client, tokens, positions, ours, real)
    want = nnx.jit(lambda m: m(tokens, positions, spec))(client)
    assert_real_rows_close(got, want, real, 1e-4, "logits vs the float64 spec")
    autodiff = functools.partial(spec_attention, differentiable=True, **common)
    _, want_grads = logits_and_grads(client, tokens, positions, autodiff, real)
    assert_grads_close(got_grads, want_grads, 2e-4)
    # rewiring changed something: the comparison above is not the beta = 0 one again
    original = functools.partial(gemma_attention, segment_ids=real, soft_cap=SOFT_CAP)
    baseline = nnx.jit(lambda m: m(tokens, positions, original))(client)
    assert np.abs(np.asarray(got - baseline)[np.asarray(real)]).max() > 1e-2


@pytest.mark.parametrize("implementation", ("xla", "pallas_tpu_interpret"))
def test_bfloat16_model_within_tolerance(implementation):
    """The client in bfloat16 (weights and activations) against the float64 spec run on the same
    bfloat16 weights cast to float32."""
    tokens, real, positions = left_padded_prompts(3)
    client = model(2, dtype=jnp.bfloat16)
    common = dict(segment_ids=real, soft_cap=SOFT_CAP, beta=0.8)
    ours = functools.partial(runway_attention, implementation=implementation, **common)
    got = nnx.jit(lambda m: m(tokens, positions, ours))(client)
    spec = functools.partial(spec_attention, differentiable=False, **common)
    want = nnx.jit(lambda m: m(tokens, positions, spec))(client)
    scale = np.abs(np.asarray(want)[np.asarray(real)]).max()
    assert_real_rows_close(got / scale, want / scale, real, 3e-2, "bf16 logits (relative)")


def test_the_swapped_model_trains():
    """The rewired client learns a copy task with optax (loss falls by more than half); the
    gradient reaches the re-purposed runway head's query and key weights."""
    rng = np.random.default_rng(4)
    half = rng.integers(1, VOCAB, (8, 8))
    tokens = jnp.asarray(np.concatenate([half, half], axis=1), jnp.int32)  # second half repeats
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    real = jnp.ones(tokens[:, :-1].shape, bool)
    attend = functools.partial(runway_attention, segment_ids=real, soft_cap=SOFT_CAP, beta=1.0,
                               implementation="xla")
    client = model(3)
    optimizer = nnx.Optimizer(client, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(client, optimizer):
        def loss(client):
            logits = client(tokens[:, :-1], positions[:, :-1], attend)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, 7:],
                                                                   tokens[:, 8:]).mean()

        value, grads = nnx.value_and_grad(loss)(client)
        optimizer.update(client, grads)
        return value, grads

    losses = []
    for _ in range(40):
        value, grads = step(client, optimizer)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    runway_rows = grads.blocks[0].query.kernel[...].reshape(FEATURES, HEADS, WIDTH)[:, -1]
    assert float(jnp.abs(runway_rows).max()) > 0


def cached_logits(client, tokens, lengths, new_tokens, *, soft_cap, beta, implementation):
    """The client decoding through runway_jax.cache: the right-padded prompts in one parallel
    prefill, then ``new_tokens`` ``[B, N]`` one step at a time; logits of every step."""
    batch, prompt_length = tokens.shape
    options = dict(beta=beta, logits_soft_cap=soft_cap, scale=QUERY_PRE_ATTN_SCALAR ** -0.5,
                   implementation=implementation)

    @functools.partial(nnx.jit, static_argnums=4)
    def run(client, caches, tokens, positions, call):
        caches = list(caches)

        def attend(q, k, v, *, window, layer):
            out, caches[layer] = call(caches[layer], q, k, v, *runway_call_arguments(q, k),
                                      local_window_size=window, **options)
            return out
        return client(tokens, positions, attend), caches

    caches = [kv_cache.init_cache(batch, prompt_length + new_tokens.shape[1], kv_heads=KV_HEADS,
                                  head_width=WIDTH) for _ in LAYER_WINDOWS]
    prefill = functools.partial(kv_cache.prefill, lengths=lengths)
    logits, caches = run(client, caches, tokens,
                         jnp.broadcast_to(jnp.arange(prompt_length), tokens.shape), prefill)
    steps = [logits]
    for n in range(new_tokens.shape[1]):
        positions = caches[0].lengths[:, None]
        logits, caches = run(client, caches, new_tokens[:, n:n + 1], positions,
                             kv_cache.decode_step)
        steps.append(logits)
    return steps


@pytest.mark.parametrize("beta", [0.0, 0.8])
def test_cached_decoding_reproduces_the_full_forward(beta):
    """Invariant 8 in the user's model: ragged prompts prefilled in one pass and 3 decode steps
    give, row by row, the logits of the full forward pass over that row alone (local window,
    soft cap, GQA, the re-purposed head)."""
    rng = np.random.default_rng(5)
    lengths = np.array([7, 4])
    prompts = np.zeros((2, 7), np.int32)
    for row, length in enumerate(lengths):
        prompts[row, :length] = rng.integers(1, VOCAB, length)
    new_tokens = rng.integers(1, VOCAB, (2, 3)).astype(np.int32)
    client = model(4)
    steps = cached_logits(client, jnp.asarray(prompts), jnp.asarray(lengths),
                          jnp.asarray(new_tokens), soft_cap=SOFT_CAP, beta=beta,
                          implementation="xla")
    for row, length in enumerate(lengths):
        sequence = jnp.asarray(np.concatenate([prompts[row, :length], new_tokens[row]]))[None]
        real = jnp.ones(sequence.shape, bool)
        attend = functools.partial(runway_attention, segment_ids=real, soft_cap=SOFT_CAP,
                                   beta=beta, implementation="reference")
        full = nnx.jit(lambda m: m(sequence, jnp.arange(sequence.shape[1])[None], attend))(client)
        np.testing.assert_allclose(steps[0][row, :length], full[0, :length], atol=2e-5, rtol=0)
        for n in range(new_tokens.shape[1]):
            np.testing.assert_allclose(steps[n + 1][row, 0], full[0, length + n], atol=2e-5,
                                       rtol=0, err_msg=f"decode step {n}")
