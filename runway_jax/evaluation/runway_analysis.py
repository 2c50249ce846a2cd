"""What the runway head does inside a trained model, and what rewiring changes.

* :func:`attention_maps`: per layer, the attention the model really applies (the rewired heads'
  softmax of ``s - beta * rho``, METHOD eq. (3), or standard causal attention), and in rewired
  layers the runway head's own attention ``A`` (eq. (1)) and the runway coefficients ``rho``
  (eq. (2)). They come from the layer itself (``multi_head_attention(...,
  return_probabilities=True)``, the library attention's ``"reference"`` implementation), the
  same call that computes the layer's output, so segment ids and every layer option are
  honoured; ``T x T`` arrays: an analysis tool for short sequences.
* :func:`early_token_mass`: the share of attention on the first few tokens (the early-token bias,
  attention sinks), per layer, against the share uniform attention would give.
* :func:`dependence_by_distance`: how strongly the last hidden state at position i depends on the
  input embedding at position j, ``||d h_i / d x_j||_F`` averaged over pairs with the same
  distance ``i - j``; estimated with Gaussian probes (``E ||J^T u||^2 = ||J||_F^2``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runway_jax.attention_layer import multi_head_attention
from runway_jax.evaluation import plots


def layer_attention(x, weights, config, positions, *, segment_ids=None):
    """One attention layer's maps for input ``x`` ``[B, T, D]`` (the layer's normed input),
    computed in float32.

    Returns a dict with ``probs`` ``[B, H_out, T, T]`` (the attention applied to the values of
    the ``H_out`` heads the output projection reads), and in a rewired layer ``runway``
    ``[B, T, T]`` (A of eq. (1)) and ``rho`` ``[B, T, T]`` (eq. (2)). ``segment_ids`` (int
    ``[B, T]``, packed documents) as the layer takes them.
    """
    _, probabilities = multi_head_attention(x, weights, config, positions=positions,
                                            segment_ids=segment_ids, dtype=jnp.float32,
                                            return_probabilities=True)
    maps = {"probs": probabilities.heads}
    if probabilities.runway is not None:
        maps["runway"] = probabilities.runway
        maps["rho"] = probabilities.runway_coefficients
    return maps


@nnx.jit
def attention_maps(model, tokens, positions=None, segment_ids=None):
    """Per layer of ``model`` on ``tokens`` ``[B, T]``: the dict of :func:`layer_attention`.
    ``positions`` and ``segment_ids`` (int ``[B, T]``) as the model takes them: default
    ``0..T-1`` and one segment per row; for packed rows positions restart at every document."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = model.embed(tokens).astype(jnp.float32)
    layers = []
    for block in model.blocks:
        layers.append(layer_attention(block.attention_norm(x), block.attention.weights(),
                                      block.attention.config, positions, segment_ids=segment_ids))
        x = block(x, positions=positions, segment_ids=segment_ids)
    return layers


def early_token_mass(layers, early_tokens: int) -> list[dict]:
    """Per layer: mean attention mass on keys ``j < early_tokens`` over heads, sequences and the
    queries ``i >= early_tokens`` (which could attend elsewhere), and the same for uniform causal
    attention (``early_tokens / (i + 1)``) as the no-bias reference."""
    results = []
    for maps in layers:
        probs = np.asarray(maps["probs"])  # [B, H, T, T]
        length = probs.shape[-1]
        if not 0 < early_tokens < length:
            raise ValueError(f"early_tokens={early_tokens} must be in [1, {length - 1}] for length {length}.")
        mass = probs[..., early_tokens:, :early_tokens].sum(-1)  # [B, H, T - early]
        uniform = early_tokens / (np.arange(early_tokens, length) + 1.0)
        results.append({"mass": float(mass.mean()), "uniform": float(uniform.mean()),
                        "mass_by_head": mass.mean(axis=(0, 2)).round(5).tolist()})
    return results


def mean_maps(layers) -> list[dict]:
    """Per layer, the runway attention and rho averaged over the batch (rewired layers only)."""
    return [{name: np.asarray(maps[name]).mean(0) for name in ("runway", "rho") if name in maps}
            for maps in layers]


def dependence_by_distance(model, tokens, *, probes: int = 4, seed: int = 0) -> np.ndarray:
    """``[T]``: mean over rows and over pairs ``i - j = distance`` of ``||d h_i / d x_j||_F``,
    where x is the input embedding and h the last block's output (before the final norm)."""
    length = tokens.shape[1]
    rows = []
    for row, sequence in enumerate(np.asarray(tokens)):
        key = jax.random.fold_in(jax.random.key(seed), row)
        squared = _jacobian_squared_norms(model, jnp.asarray(sequence), key, probes)  # [T(i), T(j)]
        rows.append(np.sqrt(np.maximum(np.asarray(squared), 0.0)))
    norms = np.mean(rows, axis=0)
    i, j = np.tril_indices(length)
    return np.bincount(i - j, weights=norms[i, j], minlength=length) / np.bincount(i - j, minlength=length)


@nnx.jit(static_argnums=3)
def _jacobian_squared_norms(model, sequence, key, probes):
    positions = jnp.arange(sequence.shape[0])[None]
    embedded = model.embed(sequence[None]).astype(jnp.float32)[0]  # [T, D]

    def hidden(x):
        x = x[None]
        for block in model.blocks:
            x = block(x, positions=positions, segment_ids=None)
        return x[0]

    _, pullback = jax.vjp(hidden, embedded)
    length, features = embedded.shape
    directions = jax.random.normal(key, (probes, length, features))

    def per_position(i):
        # A probe on output position i only: its pullback's norm at j estimates ||J_ij||_F.
        def one(direction):
            masked = jnp.zeros_like(direction).at[i].set(direction[i])
            return jnp.sum(pullback(masked)[0] ** 2, axis=-1)  # [T(j)]
        return jnp.mean(jax.vmap(one)(directions), axis=0)

    return jax.lax.map(per_position, jnp.arange(length))


def plot(curves: dict, path: str) -> None:
    """Runway attention and rho heat maps of the first rewired model (one row per rewired layer),
    early-token mass per layer, and dependence by distance, every model on the shared panels."""
    import matplotlib

    plt = plots.pyplot()
    heatmaps = next(([(name, index, maps) for index, maps in enumerate(curve["maps"]) if maps]
                     for name, curve in curves.items() if any(curve["maps"])), [])
    rows = max(1, len(heatmaps))
    figure, axes = plt.subplots(rows, 4, figsize=(20, 4.2 * rows), squeeze=False)
    for row, (name, layer, maps) in enumerate(heatmaps):
        for column, key, title in ((0, "runway", "runway head attention A"), (1, "rho", "rho")):
            image = maps[key]
            limit = np.abs(image).max() or 1.0
            if key == "runway":  # square-root colours: the first tokens would hide the rest
                norm = matplotlib.colors.PowerNorm(0.5, vmin=0, vmax=limit)
                shown = axes[row, column].imshow(image, cmap="viridis", norm=norm)
            else:
                shown = axes[row, column].imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[row, column].set(title=f"{name}\nlayer {layer}: {title}", xlabel="key j", ylabel="query i")
            for part in (axes[row, column].xaxis, axes[row, column].yaxis):  # token indices are whole
                part.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            figure.colorbar(shown, ax=axes[row, column], fraction=0.046)
    if not heatmaps:
        for column in (0, 1):
            axes[0, column].text(0.5, 0.5, "no rewired layer", ha="center")
    mass_axis, distance_axis = axes[0, 2], axes[0, 3]
    width = 0.8 / max(1, len(curves))
    for index, (name, curve) in enumerate(curves.items()):
        layers = np.arange(len(curve["early"]))
        # Bars of one layer side by side, centred on the layer's tick.
        offset = (index - (len(curves) - 1) / 2) * width
        mass_axis.bar(layers + offset, [e["mass"] for e in curve["early"]], width, label=name)
        distance = np.asarray(curve["distance"])
        distance_axis.plot(np.arange(len(distance)), distance, label=name)
    first = next(iter(curves.values()))
    for layer, early in enumerate(first["early"]):
        mass_axis.hlines(early["uniform"], layer - 0.4, layer + 0.4, colors="k", linestyles="--",
                         label="uniform attention" if layer == 0 else None)
    top = max([e["mass"] for curve in curves.values() for e in curve["early"]] +
              [e["uniform"] for e in first["early"]] + [1e-3])
    mass_axis.set_xticks(range(len(first["early"])))
    mass_axis.set(xlabel="layer", ylabel="attention mass", title="mass on the first tokens",
                  xlim=(-0.6, len(first["early"]) - 0.4), ylim=(0, 1.3 * top))
    distance_axis.set(xlabel="distance i - j", ylabel="||d h_i / d x_j||", yscale="log",
                      title="dependence by distance")
    plots.plain_log_axis(distance_axis, "y")
    for axis in (mass_axis, distance_axis):
        axis.legend(fontsize=8)
        axis.grid(True, alpha=0.3)
    for row in range(1, rows):
        axes[row, 2].axis("off")
        axes[row, 3].axis("off")
    plots.save_png(figure, path, dpi=90)
