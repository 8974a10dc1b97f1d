"""Attention kernels: full softmax attention and Longformer sliding-window plus global attention.

Dimension letters used in einsum strings and shape notes:
  B batch, T query length, S key length, N heads, H head dim, G global slots,
  C blocks, Q query positions in a block, K key positions of a block's neighbourhood.

Window convention: `window` below is the one-sided radius w. A token at position i attends to
keys j with |i - j| <= w (2w + 1 keys with itself), which is the Hugging Face
`attention_window` of 2w. Global tokens attend to every non-padding key with their own
projections, and every token attends to every global token.

The long path never builds a T x T score matrix. Queries are cut into blocks of `block_size`
positions; each block scores the keys of itself and of `ceil(w / block_size)` neighbouring
blocks on each side, and a static (Q, K) band mask keeps only |i - j| <= w. Global keys enter
through a fixed number G of slots, so every shape is static under `jax.jit`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from longflax.modeling.layers import dropout

# Masked logits get this value instead of -inf: a row whose keys are all masked then gets a
# uniform (finite) distribution instead of NaN, and padding rows are zeroed afterwards.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def _softmax_fp32(logits: Array) -> Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@jax.custom_vjp
def _attend(logits: Array, values: Array, keep_scale: Array | None) -> Array:
    """Compute softmax(logits) @ values over the last two axes, with optional dropout.

    `keep_scale` multiplies the probabilities (0 for dropped, 1 / keep probability for kept
    entries), or is None. The custom backward pass uses sum_k(dP * P) = sum_h(dO * O) per
    query, so it reduces over the head dimension instead of over the keys. On XLA's CPU backend
    the reduction over keys, fused with the matmul before it, made the backward pass of the
    banded kernel about 1.5x slower.
    """
    return _attend_forward(logits, values, keep_scale)[0]


def _attend_forward(logits, values, keep_scale):
    probs = _softmax_fp32(logits)
    kept_probs = probs if keep_scale is None else probs * keep_scale
    out = jnp.einsum("...QK,...KH->...QH", kept_probs.astype(values.dtype), values)
    return out, (probs, values, keep_scale, out)


def _attend_backward(residuals, out_grad):
    probs, values, keep_scale, out = residuals
    kept_probs = probs if keep_scale is None else probs * keep_scale
    values_grad = jnp.einsum("...QK,...QH->...KH", kept_probs.astype(values.dtype), out_grad.astype(values.dtype))
    probs_grad = jnp.einsum("...QH,...KH->...QK", out_grad, values, preferred_element_type=jnp.float32)
    if keep_scale is not None:
        probs_grad = probs_grad * keep_scale
    row_dot = jnp.sum(out_grad.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    logits_grad = probs * (probs_grad - row_dot)
    scale_grad = None if keep_scale is None else jnp.zeros_like(keep_scale)
    return logits_grad, values_grad, scale_grad


_attend.defvjp(_attend_forward, _attend_backward)


def _keep_scale(shape: tuple[int, ...], rate: float, rng: jax.Array | None) -> Array | None:
    """Return the dropout multipliers of a tensor of `shape`, or None without dropout."""
    if rng is None or rate == 0.0:
        return None
    return dropout(jnp.ones(shape, jnp.float32), rate, rng)


def full_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S N H"],
    value: Float[Array, "B S N H"],
    key_mask: Bool[Array, "B S"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "B T N H"]:
    """Softmax attention over all unmasked keys; `query` is already scaled by 1/sqrt(H)."""
    logits = jnp.einsum("BTNH,BSNH->BNTS", query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(key_mask[:, None, None, :], logits, MASK_VALUE)
    out = _attend(logits, value.transpose(0, 2, 1, 3), _keep_scale(logits.shape, dropout_rate, dropout_rng))
    return out.transpose(0, 2, 1, 3)


def _neighbour_blocks(x: Array, num_neighbours: int, *, axis: int) -> Array:
    """Gather each block's neighbourhood along `axis` (the block axis; positions follow it).

    (..., C, Q, ...) -> (..., C, (2m + 1) * Q, ...). Blocks outside the sequence are zeros
    (False for masks); the caller masks them out.
    """
    num_blocks = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (num_neighbours, num_neighbours)
    padded = jnp.pad(x, pad)
    shifted = [
        jax.lax.slice_in_dim(padded, offset, offset + num_blocks, axis=axis)
        for offset in range(2 * num_neighbours + 1)
    ]
    return jnp.concatenate(shifted, axis=axis + 1)


def band_mask(block_size: int, num_neighbours: int, radius: int) -> Bool[Array, "Q K"]:
    """Static mask of one block: query q sees neighbourhood key k when |i - j| <= radius."""
    query_pos = jnp.arange(block_size)[:, None]
    key_pos = jnp.arange((2 * num_neighbours + 1) * block_size)[None, :] - num_neighbours * block_size
    return jnp.abs(key_pos - query_pos) <= radius


# Blocks shorter than this make many tiny matmuls whose overhead outweighs the saved work.
MIN_BLOCK_SIZE = 128


def choose_block_size(length: int, radius: int) -> int:
    """Pick the query block size that scores the fewest keys per query.

    A block of b queries scores (2 * ceil(radius / b) + 1) * b keys, so b = radius costs 3w
    keys per query (1.5 times the 2w + 1 needed), smaller blocks approach 2w + b, and one block
    covering the whole sequence costs T. Candidates are the divisors of `length` of at least
    `MIN_BLOCK_SIZE` (or `length` itself); ties go to the larger block.
    """
    candidates = [b for b in range(min(MIN_BLOCK_SIZE, length), length + 1) if length % b == 0]

    def keys_per_query(size: int) -> int:
        neighbours = min(math.ceil(radius / size), length // size - 1)
        return (2 * neighbours + 1) * size

    return min(candidates, key=lambda b: (keys_per_query(b), -b))


def global_slots(
    global_mask: Bool[Array, "B T"], num_slots: int
) -> tuple[Int[Array, "B G"], Bool[Array, "B G"]]:
    """Compact the global positions of each row into `num_slots` static slots.

    Returns the positions (globals first, in order; unused slots point at distinct non-global
    positions) and which slots hold a global token. Rows with more than `num_slots` global
    tokens keep only the first ones: callers check the count on the host beforehand.
    """
    order = jnp.argsort(~global_mask, axis=-1, stable=True)[:, :num_slots]
    count = jnp.sum(global_mask, axis=-1, keepdims=True)
    valid = jnp.arange(order.shape[1])[None, :] < count
    return order.astype(jnp.int32), valid


def _take_rows(x: Array, indices: Int[Array, "B G"]) -> Array:
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def sliding_window_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B T N H"],
    value: Float[Array, "B T N H"],
    attention_mask: Bool[Array, "B T"],
    *,
    radius: int,
    global_index: Int[Array, "B G"] | None = None,
    global_valid: Bool[Array, "B G"] | None = None,
    block_size: int | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "B T N H"]:
    """Longformer local attention of every row: band keys plus global keys, one joint softmax.

    Args:
      query: projected queries, already scaled by 1/sqrt(H).
      key: projected keys (the local projection).
      value: projected values (the local projection).
      attention_mask: True at real tokens, False at padding.
      radius: one-sided window w; keys with |i - j| <= w are in the band.
      global_index: positions of the global tokens in each row (see `global_slots`), or None
        when no row has a global token.
      global_valid: which slots of `global_index` are real global tokens.
      block_size: query block length; must divide T. Defaults to `choose_block_size`.
      dropout_rate: dropout on the attention probabilities.
      dropout_rng: key for that dropout; None means no dropout.

    Returns:
      The attention output; rows of padding tokens are zero. Rows of global tokens hold the
      local result and are overwritten by `global_attention`.
    """
    batch, length, num_heads, head_dim = query.shape
    size = block_size or choose_block_size(length, radius)
    if length % size:
        raise ValueError(f"block_size={size} does not divide the sequence length {length}.")
    num_blocks = length // size
    neighbours = min(math.ceil(radius / size), num_blocks - 1)

    # Band keys exclude padding and global tokens: global keys enter once, through the slots.
    key_ok = attention_mask
    if global_index is not None:
        is_global = jnp.zeros_like(attention_mask)
        is_global = jax.vmap(lambda row, idx, ok: row.at[idx].max(ok))(
            is_global, global_index, global_valid
        )
        key_ok = attention_mask & ~is_global

    # Head-major blocks make both products plain batched matmuls over (B, N, C) with no
    # transposes inside the block loop: (B, T, N, H) -> (B, N, C, Q, H); keys and values of
    # each block's neighbourhood -> (B, N, C, K, H).
    def head_major_blocks(x: Array) -> Array:
        return x.transpose(0, 2, 1, 3).reshape(batch, num_heads, num_blocks, size, head_dim)

    q = head_major_blocks(query)
    k = _neighbour_blocks(head_major_blocks(key), neighbours, axis=2)
    v = _neighbour_blocks(head_major_blocks(value), neighbours, axis=2)
    # Zero-padded neighbour blocks have key_ok False because jnp.pad fills booleans with False.
    k_ok = _neighbour_blocks(key_ok.reshape(batch, num_blocks, size), neighbours, axis=1)
    band = band_mask(size, neighbours, radius)

    logits = jnp.einsum("BNCQH,BNCKH->BNCQK", q, k, preferred_element_type=jnp.float32)
    mask = band[None, None, None] & k_ok[:, None, :, None, :]
    logits = jnp.where(mask, logits, MASK_VALUE)

    if global_index is not None:
        k_global = _take_rows(key, global_index).transpose(0, 2, 1, 3)  # (B, N, G, H)
        v_global = _take_rows(value, global_index).transpose(0, 2, 1, 3)
        global_logits = jnp.einsum("BNCQH,BNGH->BNCQG", q, k_global, preferred_element_type=jnp.float32)
        global_logits = jnp.where(global_valid[:, None, None, None, :], global_logits, MASK_VALUE)
        logits = jnp.concatenate([global_logits, logits], axis=-1)
        # Every block attends to the same global values, which come before its band values.
        v_global = jnp.broadcast_to(v_global[:, :, None], (batch, num_heads, num_blocks) + v_global.shape[2:])
        v = jnp.concatenate([v_global, v], axis=3)

    out = _attend(logits, v, _keep_scale(logits.shape, dropout_rate, dropout_rng))
    out = out.reshape(batch, num_heads, length, head_dim).transpose(0, 2, 1, 3)
    return jnp.where(attention_mask[:, :, None, None], out, 0.0).astype(value.dtype)


def global_attention(
    global_query: Float[Array, "B G N H"],
    key: Float[Array, "B T N H"],
    value: Float[Array, "B T N H"],
    attention_mask: Bool[Array, "B T"],
    *,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "B G N H"]:
    """Attention of the global slots over every non-padding key (global projections)."""
    logits = jnp.einsum("BGNH,BTNH->BNGT", global_query, key, preferred_element_type=jnp.float32)
    logits = jnp.where(attention_mask[:, None, None, :], logits, MASK_VALUE)
    out = _attend(logits, value.transpose(0, 2, 1, 3), _keep_scale(logits.shape, dropout_rate, dropout_rng))
    return out.transpose(0, 2, 1, 3)


def scatter_global_rows(
    out: Float[Array, "B T N H"],
    global_out: Float[Array, "B G N H"],
    global_index: Int[Array, "B G"],
    global_valid: Bool[Array, "B G"],
) -> Float[Array, "B T N H"]:
    """Overwrite the rows of global tokens with their global-attention output."""
    current = _take_rows(out, global_index)
    update = jnp.where(global_valid[:, :, None, None], global_out.astype(out.dtype), current)
    return jax.vmap(lambda row, idx, new: row.at[idx].set(new))(out, global_index, update)
