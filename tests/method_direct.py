"""Direct evaluations of METHOD eqs. (1)-(3), written independently of runway_jax.

``triple_loop`` follows the equations term by term in float64 NumPy: an explicit loop over query
i, key j and runway token k. ``direct`` evaluates the same sums with a ``[T, T, T]`` runway
indicator in jnp, so that autodiff gives the gradients the implementations must match.
"""

import numpy as np
import jax
import jax.numpy as jnp


def triple_loop(query, key, value, runway_query, runway_key, *, beta, runway_coefficient,
                runway_span, segment_ids=None):
    """Returns (output [B, T, H, d], rho [B, T, T]) in float64."""
    q, k, v, rq, rk = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                       for x in (query, key, value, runway_query, runway_key))
    batch, length, heads, width = q.shape
    groups = heads // k.shape[2]
    scale = 1.0 / np.sqrt(width)
    out = np.zeros(q.shape)
    rho = np.zeros((batch, length, length))
    for b in range(batch):
        def visible(i, j):
            return j <= i and (segment_ids is None or segment_ids[b][i] == segment_ids[b][j])

        def softmax_row(logit, i):
            row = np.array([logit(j) if visible(i, j) else -np.inf for j in range(length)])
            e = np.exp(row - row.max())
            return e / e.sum()

        # eq. (1): the runway head's causal attention A.
        A = np.stack([softmax_row(lambda j: scale * rq[b, i] @ rk[b, j], i) for i in range(length)])
        w = rq[b] if runway_coefficient == "bilinear" else rk[b]

        def g(kk, j):  # eq. (2) kernel
            return scale * w[kk] @ rk[b, j]

        for i in range(length):
            for j in range(i + 1):
                if not visible(i, j):
                    continue
                runway = range(j + 1, i) if runway_span == "exact" else range(0, i)
                rho[b, i, j] = sum(A[i, kk] * g(kk, j) for kk in runway)
        for h in range(heads):
            for i in range(length):
                p = softmax_row(lambda j: scale * q[b, i, h] @ k[b, j, h // groups]
                                - beta * rho[b, i, j], i)  # eq. (3)
                out[b, i, h] = p @ v[b, :, h // groups]
    return out, rho


def direct(query, key, value, runway_query, runway_key, *, beta, runway_coefficient, runway_span,
           segment_ids=None):
    """Differentiable float32 evaluation of eqs. (2)-(3) with an explicit [T, T, T] runway mask."""
    q, k, v, rq, rk = (jnp.asarray(x, jnp.float32) for x in (query, key, value, runway_query, runway_key))
    batch, length, heads, width = q.shape
    groups = heads // k.shape[2]
    scale = 1.0 / np.sqrt(width)
    i = np.arange(length)[:, None, None]
    kk = np.arange(length)[None, :, None]
    j = np.arange(length)[None, None, :]
    visible = np.arange(length)[None, :] <= np.arange(length)[:, None]  # [i, j]
    visible = jnp.broadcast_to(visible, (batch, length, length))
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    A = jax.nn.softmax(jnp.where(visible, scale * jnp.einsum("bid,bjd->bij", rq, rk), -jnp.inf), -1)
    w = rq if runway_coefficient == "bilinear" else rk
    g = scale * jnp.einsum("bkd,bjd->bkj", w, rk)
    runway = (j < kk) & (kk < i) if runway_span == "exact" else (kk < i) & (j <= i)  # [i, k, j]
    rho = jnp.einsum("bik,bkj,ikj->bij", A, g, runway.astype(np.float32))
    rho = jnp.where(visible, rho, 0.0)
    k_h = jnp.repeat(k, groups, axis=2)
    v_h = jnp.repeat(v, groups, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q, k_h) - beta * rho[:, None]
    p = jax.nn.softmax(jnp.where(visible[:, None], logits, -jnp.inf), -1)
    return jnp.einsum("bhij,bjhd->bihd", p, v_h), rho
