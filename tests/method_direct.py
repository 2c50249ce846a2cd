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


def spec_loop(query, key, value, runway_query, runway_key, *, beta, runway_coefficient,
              runway_span, mask=None, segment_ids=None, local_window_size=None,
              logits_soft_cap=None, key_value_seq_lengths=None, scale=None,
              alibi_slopes=None, runway_alibi_slope=None, return_probabilities=False):
    """METHOD eqs. (2), (3) with the options of (7), term by term in float64 NumPy.

    ``query`` has ``Tq <= Tk`` rows at positions ``p_r = L_b - Tq + r`` (``L_b = Tk`` or
    ``key_value_seq_lengths[b]``); visibility (7a); soft cap after every bias (7b, 7c), ALiBi
    ``-m (i - j)`` among the biases.
    Returns (output [B, Tq, H, d], rho [B, Tq, Tk]), with ``return_probabilities`` also the
    runway head's A [B, Tq, Tk] and the heads' softmax weights [B, H, Tq, Tk].
    """
    q, k, v, rq, rk = (np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                       for x in (query, key, value, runway_query, runway_key))
    batch, query_length, heads, width = q.shape
    key_length = k.shape[1]
    groups = heads // k.shape[2]
    scale = 1.0 / np.sqrt(width) if scale is None else float(scale)
    beta = float(beta)
    mask = None if mask is None else np.broadcast_to(np.asarray(mask), (batch, query_length, key_length))
    cap = (lambda x: x) if logits_soft_cap is None else (
        lambda x: logits_soft_cap * np.tanh(x / logits_soft_cap))
    out = np.zeros(q.shape)
    rho = np.zeros((batch, query_length, key_length))
    runway_probs = np.zeros((batch, query_length, key_length))
    head_probs = np.zeros((batch, heads, query_length, key_length))
    slopes = np.zeros(heads) if alibi_slopes is None else np.asarray(alibi_slopes, np.float64)
    runway_slope = 0.0 if runway_alibi_slope is None else float(runway_alibi_slope)
    for b in range(batch):
        end = key_length if key_value_seq_lengths is None else int(key_value_seq_lengths[b])
        seg = None if segment_ids is None else np.asarray(segment_ids)[b]
        for r in range(query_length):
            i = end - query_length + r

            def visible(j):
                return (0 <= j <= i and (local_window_size is None or i - j <= local_window_size)
                        and (seg is None or seg[i] == seg[j]) and (mask is None or mask[b, r, j]))

            def softmax(logit):
                row = np.array([cap(logit(j)) if visible(j) else -np.inf for j in range(key_length)])
                if not np.isfinite(row).any():
                    return np.zeros(key_length)
                e = np.exp(row - row.max())
                return e / e.sum()

            A = softmax(lambda j: scale * rq[b, i] @ rk[b, j] - runway_slope * (i - j))  # (7b)
            runway_probs[b, r] = A
            w = rq[b] if runway_coefficient == "bilinear" else rk[b]
            for j in range(key_length):
                if not visible(j):
                    continue
                runway = range(j + 1, i) if runway_span == "exact" else range(0, i)
                rho[b, r, j] = sum(A[kk] * scale * (w[kk] @ rk[b, j]) for kk in runway)
            for h in range(heads):
                p = softmax(lambda j: scale * q[b, r, h] @ k[b, j, h // groups]
                            - beta * rho[b, r, j] - slopes[h] * (i - j))  # (3), (7c)
                head_probs[b, h, r] = p
                out[b, r, h] = p @ v[b, :, h // groups]
    if return_probabilities:
        return out, rho, runway_probs, head_probs
    return out, rho


def direct_options(query, key, value, runway_query, runway_key, *, beta, runway_coefficient,
                   runway_span, mask=None, segment_ids=None, local_window_size=None,
                   logits_soft_cap=None, key_value_seq_lengths=None, scale=None):
    """Differentiable float32 twin of :func:`spec_loop`, with an explicit [Tq, Tk, Tk] runway
    indicator (autodiff of it gives the gradients the implementations must match)."""
    q, k, v, rq, rk = (jnp.asarray(x, jnp.float32) for x in (query, key, value, runway_query, runway_key))
    batch, query_length, heads, width = q.shape
    key_length = k.shape[1]
    groups = heads // k.shape[2]
    scale = 1.0 / np.sqrt(width) if scale is None else scale
    ends = (jnp.full((batch,), key_length) if key_value_seq_lengths is None
            else jnp.asarray(key_value_seq_lengths))
    i = ends[:, None] - query_length + jnp.arange(query_length)[None]  # [B, Tq] positions
    j = jnp.arange(key_length)
    visible = (j[None, None] <= i[:, :, None]) & (i[:, :, None] >= 0)
    if local_window_size is not None:
        visible &= i[:, :, None] - j[None, None] <= local_window_size
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids).astype(jnp.int32)
        own = jnp.take_along_axis(seg, jnp.clip(i, 0, key_length - 1), axis=1)
        visible &= own[:, :, None] == seg[:, None, :]
    if mask is not None:
        visible &= jnp.broadcast_to(jnp.asarray(mask), visible.shape)
    cap = (lambda x: x) if logits_soft_cap is None else (
        lambda x: logits_soft_cap * jnp.tanh(x / logits_soft_cap))

    def softmax(logits, visible):
        p = jax.nn.softmax(jnp.where(visible, cap(logits), -1e30), -1)
        return jnp.where(visible, p, 0.0)

    own_rq = jnp.take_along_axis(rq, jnp.clip(i, 0, key_length - 1)[..., None], axis=1)
    A = softmax(scale * jnp.einsum("bid,bkd->bik", own_rq, rk), visible)  # [B, Tq, Tk]
    w = rq if runway_coefficient == "bilinear" else rk
    g = scale * jnp.einsum("bkd,bjd->bkj", w, rk)
    kk = j[None, None, :, None]
    jj = j[None, None, None, :]
    ii = i[:, :, None, None]
    runway = (jj < kk) & (kk < ii) if runway_span == "exact" else (kk < ii) & (jj <= ii)
    rho = jnp.einsum("bik,bkj,bikj->bij", A, g, runway.astype(jnp.float32))
    rho = jnp.where(visible, rho, 0.0)
    k_h = jnp.repeat(k, groups, axis=2)
    v_h = jnp.repeat(v, groups, axis=2)
    logits = scale * jnp.einsum("bihd,bjhd->bhij", q, k_h) - beta * rho[:, None]
    p = softmax(logits, visible[:, None])
    return jnp.einsum("bhij,bjhd->bihd", p, v_h), rho
