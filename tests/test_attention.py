"""Tests for longflax.modeling.attention: blocked sliding-window plus global attention.

Every case compares the blocked kernels, composed the way the encoder composes them, with a
dense oracle that builds the explicit T x T mask: a query i that is not global sees key j when
|i - j| <= radius or j is global, a global query attends to every key, and padding keys are never
seen. Global query rows use the global projections, as in Longformer.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longflax.modeling import attention as attn

NUM_HEADS = 2
HEAD_DIM = 4


def oracle_mask(
    length: int, radius: int, is_global: np.ndarray, key_mask: np.ndarray
) -> np.ndarray:
    """Build the (T, T) mask of one row: which keys j each query i attends to.

    Rows of padding tokens are all False; rows of global tokens see every real key.
    """
    positions = np.arange(length)
    allowed = np.abs(positions[:, None] - positions[None, :]) <= radius
    allowed |= is_global[None, :]
    allowed[is_global] = True
    allowed &= key_mask[None, :]
    allowed[~key_mask] = False
    return allowed


def dense_attention(query, key, value, allowed):
    """Softmax attention of (T, N, H) inputs under an explicit (T, T) mask, in float64."""
    logits = np.einsum("TNH,SNH->NTS", query, key)
    logits = np.where(allowed[None], logits, -np.inf)
    logits = logits - np.max(np.where(allowed[None], logits, -1e30), axis=-1, keepdims=True)
    weights = np.where(allowed[None], np.exp(logits), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("NTS,SNH->TNH", probs, value)


def dense_oracle(inputs, radius, is_global, key_mask):
    """Longformer attention of a batch computed densely: local rows, then global rows."""
    q, k, v, q_global, k_global, v_global = (np.asarray(x, np.float64) for x in inputs)
    batch, length = key_mask.shape
    out = np.zeros_like(q)
    for row in range(batch):
        allowed = oracle_mask(length, radius, is_global[row], key_mask[row])
        local = dense_attention(q[row], k[row], v[row], allowed)
        out[row] = local
        glob = dense_attention(q_global[row], k_global[row], v_global[row], allowed)
        out[row][is_global[row]] = glob[is_global[row]]
    return out


def blocked_attention(inputs, radius, is_global, key_mask, *, block_size=None, num_slots=6):
    """Run the blocked kernels the way `SelfAttention` composes them (compiled)."""
    is_global = np.asarray(is_global) & np.asarray(key_mask)
    return _blocked_attention(
        inputs,
        jnp.asarray(is_global),
        jnp.asarray(key_mask),
        radius=radius,
        block_size=block_size,
        num_slots=num_slots if is_global.any() else 0,
    )


@functools.partial(jax.jit, static_argnames=("radius", "block_size", "num_slots"))
def _blocked_attention(inputs, is_global, key_mask, *, radius, block_size, num_slots):
    q, k, v, q_global, k_global, v_global = inputs
    if not num_slots:
        return attn.sliding_window_attention(
            q, k, v, key_mask, radius=radius, block_size=block_size
        )
    index, valid = attn.global_slots(is_global, num_slots)
    out = attn.sliding_window_attention(
        q,
        k,
        v,
        key_mask,
        radius=radius,
        global_index=index,
        global_valid=valid,
        block_size=block_size,
    )
    query_rows = jnp.take_along_axis(q_global, index[:, :, None, None], axis=1)
    out_global = attn.global_attention(query_rows, k_global, v_global, key_mask)
    return attn.scatter_global_rows(out, out_global, index, valid)


def random_inputs(batch, length, *, seed=0, dtype=jnp.float32):
    """Queries, keys and values, local then global, each of shape (B, T, N, H)."""
    rng = np.random.default_rng(seed)
    shape = (batch, length, NUM_HEADS, HEAD_DIM)
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(6))


def global_flags(length, rows):
    """(B, T) boolean flags from a list of global positions per row."""
    flags = np.zeros((len(rows), length), bool)
    for row, positions in enumerate(rows):
        flags[row, list(positions)] = True
    return flags


def assert_matches_oracle(inputs, radius, is_global, key_mask, *, block_size=None, atol=1e-5):
    out = np.asarray(blocked_attention(inputs, radius, is_global, key_mask, block_size=block_size))
    expected = dense_oracle(inputs, radius, is_global, key_mask)
    real = key_mask[:, :, None, None]
    np.testing.assert_allclose(np.where(real, out, 0.0), np.where(real, expected, 0.0), atol=atol)
    assert np.isfinite(out).all()


def test_oracle_mask_written_out():
    # Six tokens, radius 1, token 2 global, token 5 padding.
    is_global = np.array([0, 0, 1, 0, 0, 0], bool)
    key_mask = np.array([1, 1, 1, 1, 1, 0], bool)
    expected = np.array(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(oracle_mask(6, 1, is_global, key_mask), expected)


def test_oracle_mask_band_only():
    # Five tokens, radius 2, no global token, no padding: a band of width 5.
    expected = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1],
            [0, 0, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(oracle_mask(5, 2, np.zeros(5, bool), np.ones(5, bool)), expected)


def test_blocked_attention_equals_written_out_mask():
    is_global = np.array([[0, 0, 1, 0, 0, 0]], bool)
    key_mask = np.array([[1, 1, 1, 1, 1, 0]], bool)
    inputs = random_inputs(1, 6, seed=3)
    written = np.array(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    q, k, v, q_global, k_global, v_global = (np.asarray(x[0], np.float64) for x in inputs)
    expected = dense_attention(q, k, v, written)
    expected[2] = dense_attention(q_global, k_global, v_global, written)[2]

    out = np.asarray(blocked_attention(inputs, 1, is_global, key_mask))[0]

    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(out[5], 0.0)


@pytest.mark.parametrize(
    ("length", "radius"),
    [
        (16, 4),  # the radius divides the length
        (13, 4),  # it does not: 13 is prime, so blocks of one token
        (18, 4),  # it does not: blocks of three tokens
        (6, 10),  # the window exceeds the length
    ],
)
def test_band_without_globals_matches_oracle(length, radius):
    inputs = random_inputs(2, length, seed=length)
    key_mask = np.ones((2, length), bool)
    key_mask[1, length - 2 :] = False
    assert_matches_oracle(inputs, radius, np.zeros((2, length), bool), key_mask)


@pytest.mark.parametrize("block_size", [1, 3, 8, 24])
def test_explicit_block_sizes_match_oracle(block_size):
    # Block sizes below, equal to and above the radius 5, up to the whole length.
    length = 24
    inputs = random_inputs(3, length, seed=block_size)
    is_global = global_flags(length, [[], [0], [3, 10, 11, 23]])
    key_mask = np.ones((3, length), bool)
    key_mask[2, 20:] = False
    assert_matches_oracle(inputs, 5, is_global, key_mask, block_size=block_size)


def test_block_size_must_divide_length():
    inputs = random_inputs(1, 12)
    with pytest.raises(ValueError, match="block_size=5 does not divide the sequence length 12"):
        attn.sliding_window_attention(*inputs[:3], jnp.ones((1, 12), bool), radius=2, block_size=5)


@pytest.mark.parametrize(
    ("name", "rows", "radius"),
    [
        ("start", [[0], [0]], 3),
        ("middle", [[7, 8], [9]], 3),
        ("per_row_count", [[], [0, 1, 2, 3, 4, 5], [4, 19]], 3),
        ("window_over_length", [[19], [0, 19]], 25),
    ],
)
def test_global_tokens_match_oracle(name, rows, radius):
    length = 20
    inputs = random_inputs(len(rows), length, seed=len(name))
    is_global = global_flags(length, rows)
    key_mask = np.ones((len(rows), length), bool)
    assert_matches_oracle(inputs, radius, is_global, key_mask)


def test_padding_flagged_global_is_padding():
    length = 12
    inputs = random_inputs(1, length, seed=5)
    key_mask = np.ones((1, length), bool)
    key_mask[0, 9:] = False
    flagged = global_flags(length, [[0, 10]])
    out_flagged = blocked_attention(inputs, 2, flagged, key_mask)
    out_plain = blocked_attention(inputs, 2, global_flags(length, [[0]]), key_mask)
    np.testing.assert_array_equal(np.asarray(out_flagged), np.asarray(out_plain))


def test_fully_padded_row_is_finite():
    length = 16
    inputs = random_inputs(2, length, seed=7)
    key_mask = np.ones((2, length), bool)
    key_mask[1] = False
    is_global = global_flags(length, [[0, 5], [0, 5]])
    out = np.asarray(blocked_attention(inputs, 4, is_global, key_mask))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1], 0.0)
    global_out = jax.jit(attn.global_attention)(*inputs[3:], jnp.asarray(key_mask))
    assert np.isfinite(np.asarray(global_out)).all()


def test_global_slots_compact_positions():
    flags = jnp.asarray(global_flags(6, [[], [4], [1, 3, 5]]))
    index, valid = attn.global_slots(flags, 3)
    np.testing.assert_array_equal(np.asarray(valid), [[0, 0, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(index)[2], [1, 3, 5])
    assert int(np.asarray(index)[1, 0]) == 4
    # Unused slots point at distinct positions, so scattering through them is harmless.
    for row in np.asarray(index):
        assert len(set(row.tolist())) == 3


def test_bfloat16_within_relative_tolerance():
    length = 40
    inputs = random_inputs(3, length, seed=11, dtype=jnp.bfloat16)
    is_global = global_flags(length, [[], [0], [0, 1, 2, 21]])
    key_mask = np.ones((3, length), bool)
    key_mask[1, 33:] = False
    out = blocked_attention(inputs, 6, is_global, key_mask)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    expected = dense_oracle(inputs, 6, is_global, key_mask)
    real = key_mask[:, :, None, None]
    error = np.max(np.abs(np.where(real, out - expected, 0.0)))
    assert error <= 2e-2 * np.max(np.abs(expected))
    assert np.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# Gradients: the kernels have a hand-written backward pass, checked against autodiff of a
# dense float32 version of the oracle.


def dense_oracle_jax(inputs, radius, is_global, key_mask):
    """Differentiable dense Longformer attention of a batch (float32, explicit masks)."""
    q, k, v, q_global, k_global, v_global = inputs
    rows = []
    for row in range(key_mask.shape[0]):
        allowed = jnp.asarray(oracle_mask(key_mask.shape[1], radius, is_global[row], key_mask[row]))

        def attend(query, key, value, allowed=allowed):
            logits = jnp.einsum("TNH,SNH->NTS", query, key)
            probs = jax.nn.softmax(jnp.where(allowed[None], logits, -1e30), axis=-1)
            probs = jnp.where(allowed.any(-1)[None, :, None], probs, 0.0)
            return jnp.einsum("NTS,SNH->TNH", probs, value)

        local = attend(q[row], k[row], v[row])
        glob = attend(q_global[row], k_global[row], v_global[row])
        rows.append(jnp.where(jnp.asarray(is_global[row])[:, None, None], glob, local))
    return jnp.stack(rows)


@pytest.mark.parametrize(
    ("rows", "radius", "padding"),
    [([[], []], 3, 0), ([[0], [2, 9]], 3, 4), ([[0, 1]], 25, 5)],
)
def test_gradients_match_dense_autodiff(rows, radius, padding):
    length = 20
    inputs = random_inputs(len(rows), length, seed=radius + padding)
    is_global = global_flags(length, rows)
    key_mask = np.ones((len(rows), length), bool)
    if padding:
        key_mask[-1, -padding:] = False
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=inputs[0].shape), jnp.float32)
    real = jnp.asarray(key_mask)[:, :, None, None]

    def loss(function, inputs):
        return jnp.sum(jnp.where(real, function(inputs) * cotangent, 0.0))

    ours = jax.grad(lambda x: loss(lambda y: blocked_attention(y, radius, is_global, key_mask), x))(inputs)
    expected = jax.grad(lambda x: loss(lambda y: dense_oracle_jax(y, radius, is_global, key_mask), x))(inputs)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_dropout_gradients_match_autodiff():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 3, 5, 7)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(2, 3, 7, 4)), jnp.float32)
    keep_scale = attn._keep_scale(logits.shape, 0.25, jax.random.key(0))
    cotangent = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)

    def plain(logits, values):
        probs = jax.nn.softmax(logits, axis=-1) * keep_scale
        return jnp.sum(jnp.einsum("...QK,...KH->...QH", probs, values) * cotangent)

    def custom(logits, values):
        return jnp.sum(attn._attend(logits, values, keep_scale) * cotangent)

    assert float(jnp.mean(keep_scale == 0.0)) > 0.0
    np.testing.assert_allclose(custom(logits, values), plain(logits, values), rtol=1e-6)
    for got, want in zip(jax.grad(custom, (0, 1))(logits, values), jax.grad(plain, (0, 1))(logits, values), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
