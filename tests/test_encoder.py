"""Tests for longflax.modeling.encoder: window semantics, padding, global attention, positions.

Reference outputs come from a dense float64 re-implementation of one post-LayerNorm layer that
reads the model's own parameters, so each case compares the blocked attention path with the
explicit mask it is meant to compute.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax import nnx

from longflax.modeling import (
    ModelConfig,
    build_model,
    default_qa_global_mask,
    position_ids_from_input_ids,
)
from longflax.modeling import encoder as encoder_module


def tiny_config(**changes) -> ModelConfig:
    """One-layer long model of hidden size 32; `changes` override any field."""
    fields = dict(
        vocab_size=1000,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        mlp_dim=48,
        max_position_embeddings=130,
        attention="longformer",
        attention_window=8,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        # Larger than the default 0.02, so that one token's influence is well above rounding.
        initializer_range=0.2,
        max_global_tokens=32,
    )
    fields.update(changes)
    return ModelConfig(**fields)


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


@nnx.jit
def _forward_hidden(model, inputs):
    return model(**inputs, output_hidden_states=True)


def forward(model, *, hidden_states=False, **inputs):
    """Run the model compiled; inputs given as None are left out."""
    inputs = {name: jnp.asarray(value) for name, value in inputs.items() if value is not None}
    return (_forward_hidden if hidden_states else _forward)(model, inputs)


def random_ids(batch, length, *, seed=0):
    """Token ids in [3, 1000) with `<s>` (id 0) first; no padding or separator ids."""
    ids = np.random.default_rng(seed).integers(3, 1000, size=(batch, length))
    ids[:, 0] = 0
    return ids


# ----------------------------------------------------------------------------------------------
# Dense reference of one layer


def _dense(module, x):
    kernel = np.asarray(module.kernel[...], np.float64)
    return x @ kernel + np.asarray(module.bias[...], np.float64)


def _layer_norm(module, x, eps):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(variance + eps)
    return normed * np.asarray(module.scale[...], np.float64) + np.asarray(
        module.bias[...], np.float64
    )


def _attend(query, key, value, allowed):
    logits = np.einsum("TNH,SNH->NTS", query, key)
    logits = np.where(allowed[None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("NTS,SNH->TNH", probs, value)


def reference_layer(layer, x, allowed, is_global, config):
    """One encoder layer in float64 for one row.

    Args:
      layer: the model's `Layer`, whose parameters are read.
      x: (T, D) input hidden states.
      allowed: (T, T) keys each non-global query sees.
      is_global: (T,) global tokens; their rows see every key through the global projections.
      config: the model config.

    Returns:
      (T, D) layer output.
    """
    x = np.asarray(x, np.float64)
    length = x.shape[0]
    attention = layer.attention
    head_dim = config.hidden_size // config.num_heads

    def heads(y):
        return y.reshape(length, config.num_heads, head_dim)

    scale = 1.0 / math.sqrt(head_dim)
    query = heads(_dense(attention.query, x) * scale)
    out = _attend(
        query, heads(_dense(attention.key, x)), heads(_dense(attention.value, x)), allowed
    )
    if is_global.any():
        global_query = heads(_dense(attention.query_global, x) * scale)
        global_key = heads(_dense(attention.key_global, x))
        global_value = heads(_dense(attention.value_global, x))
        every_key = np.ones_like(allowed)
        global_out = _attend(global_query, global_key, global_value, every_key)
        out[is_global] = global_out[is_global]
    hidden = _dense(attention.output, out.reshape(length, -1)) + x
    hidden = _layer_norm(attention.output_norm, hidden, config.layer_norm_eps)
    inner = _dense(layer.intermediate, hidden)
    inner = 0.5 * inner * (1.0 + scipy.special.erf(inner / math.sqrt(2.0)))
    return _layer_norm(
        layer.output_norm, _dense(layer.output, inner) + hidden, config.layer_norm_eps
    )


def band(length, radius):
    positions = np.arange(length)
    return np.abs(positions[:, None] - positions[None, :]) <= radius


# ----------------------------------------------------------------------------------------------
# Window semantics


def test_window_eight_sees_four_per_side():
    config = tiny_config(attention_window=8)
    model = build_model(config)
    ids = random_ids(1, 13)

    out = forward(model, hidden_states=True, input_ids=ids)

    expected = reference_layer(
        model.layers[0], out.hidden_states[0][0], band(13, 4), np.zeros(13, bool), config
    )
    np.testing.assert_allclose(np.asarray(out.last_hidden_state[0]), expected, atol=1e-5)


@pytest.mark.slow
def test_window_512_dependency_range():
    config = tiny_config(attention_window=512, max_position_embeddings=1026)
    model = build_model(config)
    ids = random_ids(1, 1000, seed=1)
    base = forward(model, hidden_states=True, input_ids=ids)

    expected = reference_layer(
        model.layers[0], base.hidden_states[0][0], band(1000, 256), np.zeros(1000, bool), config
    )
    np.testing.assert_allclose(np.asarray(base.last_hidden_state[0]), expected, atol=1e-5)

    outside = ids.copy()
    outside[0, 742] = 5 if ids[0, 742] != 5 else 6
    changed = forward(model, input_ids=outside).last_hidden_state
    np.testing.assert_array_equal(
        np.asarray(changed[0, 999]), np.asarray(base.last_hidden_state[0, 999])
    )

    inside = ids.copy()
    inside[0, 743] = 5 if ids[0, 743] != 5 else 6
    changed = forward(model, input_ids=inside).last_hidden_state
    assert np.max(np.abs(np.asarray(changed[0, 999] - base.last_hidden_state[0, 999]))) > 0


@pytest.mark.parametrize("window", [5, 0, -4])
def test_window_must_be_even_and_positive(window):
    with pytest.raises(ValueError, match=f"attention_window={window} .*must be even and positive"):
        tiny_config(attention_window=window)


def test_window_list_length_must_match_layers():
    with pytest.raises(
        ValueError, match="attention_window has 3 entries but the model has num_layers=2"
    ):
        tiny_config(num_layers=2, attention_window=(4, 8, 8))


def test_per_layer_windows():
    config = tiny_config(num_layers=2, attention_window=(4, 8))
    model = build_model(config)
    ids = random_ids(1, 13, seed=2)

    out = forward(model, hidden_states=True, input_ids=ids)

    no_globals = np.zeros(13, bool)
    first = reference_layer(
        model.layers[0], out.hidden_states[0][0], band(13, 2), no_globals, config
    )
    second = reference_layer(
        model.layers[1], out.hidden_states[1][0], band(13, 4), no_globals, config
    )
    np.testing.assert_allclose(np.asarray(out.hidden_states[1][0]), first, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden_states[2][0]), second, atol=1e-5)

    # The sequence is padded to 16, the next multiple of the largest window.
    jaxpr = jax.make_jaxpr(lambda ids: nnx.merge(*nnx.split(model))(ids).last_hidden_state)(ids)
    shapes = {tuple(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars}
    assert (1, 16, 32) in shapes
    assert not any(len(shape) == 3 and shape[:2] == (1, 24) for shape in shapes)


def test_caller_padding_equals_unpadded():
    config = tiny_config(num_layers=2, attention_window=8)
    model = build_model(config, seed=3)
    ids = random_ids(1, 13, seed=3)
    padded = np.concatenate([ids, np.full((1, 3), config.pad_token_id)], axis=1)
    mask = np.concatenate([np.ones((1, 13)), np.zeros((1, 3))], axis=1).astype(np.int32)

    plain = forward(model, input_ids=ids).last_hidden_state
    caller_padded = forward(model, input_ids=padded, attention_mask=mask).last_hidden_state

    np.testing.assert_allclose(np.asarray(caller_padded[:, :13]), np.asarray(plain), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Internal padding never leaks into outputs


def masked_lm_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


@pytest.mark.parametrize("length", [8, 513])
def test_outputs_have_input_length(length):
    config = tiny_config(attention_window=512, max_position_embeddings=1026)
    ids = random_ids(2, length, seed=length)
    flags = np.zeros_like(ids)
    flags[:, 0] = 1

    for head in ("none", "mlm", "qa"):
        model = build_model(config, head)
        out = forward(model, hidden_states=True, input_ids=ids, global_attention_mask=flags)
        assert out.last_hidden_state.shape == (2, length, 32), head
        assert len(out.hidden_states) == 2, head
        for index, hidden in enumerate(out.hidden_states):
            assert hidden.shape == (2, length, 32), (head, index)
        if head == "mlm":
            assert out.logits.shape == (2, length, 1000)
        if head == "qa":
            assert out.start_logits.shape == (2, length)
            assert out.end_logits.shape == (2, length)


def test_mlm_loss_same_with_caller_padding():
    config = tiny_config(attention_window=512, max_position_embeddings=1026)
    model = build_model(config, "mlm", seed=4)
    ids = random_ids(1, 8, seed=4)
    labels = jnp.asarray(np.random.default_rng(4).integers(3, 1000, size=(1, 8)))
    padded = np.full((1, 512), config.pad_token_id)
    padded[:, :8] = ids
    mask = np.zeros((1, 512), np.int32)
    mask[:, :8] = 1

    plain = forward(model, input_ids=ids).logits
    caller_padded = forward(model, input_ids=padded, attention_mask=mask).logits[:, :8]

    assert float(masked_lm_loss(plain, labels)) == float(masked_lm_loss(caller_padded, labels))


# ----------------------------------------------------------------------------------------------
# Global attention flag


def global_first(ids):
    flags = np.zeros_like(ids)
    flags[:, 0] = 1
    return flags


def with_token(ids, position, token):
    changed = ids.copy()
    changed[0, position] = token if ids[0, position] != token else token + 1
    return changed


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_global_token_sees_whole_row(dtype):
    config = tiny_config(attention_window=2, dtype=dtype)
    model = build_model(config, seed=5)
    ids = random_ids(1, 64, seed=5)
    flags = global_first(ids)

    base = np.asarray(
        forward(model, input_ids=ids, global_attention_mask=flags).last_hidden_state, np.float32
    )
    last_changed = forward(model, input_ids=with_token(ids, 63, 7), global_attention_mask=flags)
    first_changed = forward(model, input_ids=with_token(ids, 0, 7), global_attention_mask=flags)

    assert (
        np.max(np.abs(np.asarray(last_changed.last_hidden_state[0, 0], np.float32) - base[0, 0]))
        > 1e-3
    )
    assert (
        np.max(np.abs(np.asarray(first_changed.last_hidden_state[0, 63], np.float32) - base[0, 63]))
        > 1e-3
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_without_globals_far_token_has_no_effect(dtype):
    config = tiny_config(attention_window=2, dtype=dtype)
    model = build_model(config, seed=5)
    ids = random_ids(1, 64, seed=5)

    for flags in (None, np.zeros_like(ids)):
        base = forward(model, input_ids=ids, global_attention_mask=flags).last_hidden_state
        changed = forward(model, input_ids=with_token(ids, 63, 7), global_attention_mask=flags)
        np.testing.assert_array_equal(
            np.asarray(changed.last_hidden_state[0, 0], np.float32),
            np.asarray(base[0, 0], np.float32),
        )


@nnx.jit
def _position_zero_gradients(model, inputs, weights):
    def loss(model):
        hidden = model(**inputs).last_hidden_state
        return jnp.sum(hidden[0, 0].astype(jnp.float32) * weights)

    return nnx.grad(loss)(model)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_global_projections_receive_gradients(dtype):
    config = tiny_config(attention_window=2, dtype=dtype)
    model = build_model(config, seed=6)
    ids = random_ids(1, 64, seed=6)
    inputs = {
        "input_ids": jnp.asarray(ids),
        "global_attention_mask": jnp.asarray(global_first(ids)),
    }
    weights = jnp.asarray(np.random.default_rng(6).normal(size=32), jnp.float32)

    grads = _position_zero_gradients(model, inputs, weights)

    flat = {"/".join(map(str, path)): np.asarray(value) for path, value in nnx.to_flat_state(grads)}
    for name in ("query_global", "key_global", "value_global"):
        assert np.abs(flat[f"layers/0/attention/{name}/kernel"]).max() > 0, name


def test_padding_flagged_global_is_padding():
    config = tiny_config(attention_window=2)
    model = build_model(config, seed=7)
    ids = random_ids(1, 64, seed=7)
    ids[0, 60:] = config.pad_token_id
    mask = np.ones_like(ids)
    mask[0, 60:] = 0
    flags = global_first(ids)
    flags_on_padding = flags.copy()
    flags_on_padding[0, 62] = 1

    base = forward(model, input_ids=ids, attention_mask=mask, global_attention_mask=flags)
    flagged = forward(
        model, input_ids=ids, attention_mask=mask, global_attention_mask=flags_on_padding
    )
    other_token = forward(
        model,
        input_ids=with_token(ids, 62, 9),
        attention_mask=mask,
        global_attention_mask=flags_on_padding,
    )

    real = np.asarray(base.last_hidden_state[0, :60])
    np.testing.assert_array_equal(np.asarray(flagged.last_hidden_state[0, :60]), real)
    np.testing.assert_array_equal(np.asarray(other_token.last_hidden_state[0, :60]), real)


def test_global_mask_value_two_rejected():
    model = build_model(tiny_config())
    ids = random_ids(1, 10)
    flags = np.zeros_like(ids)
    flags[0, 0] = 2
    with pytest.raises(
        ValueError, match=r"global_attention_mask must contain only 0 and 1; got values \[0, 2\]"
    ):
        model(ids, global_attention_mask=flags)


def test_attention_mask_value_two_rejected():
    model = build_model(tiny_config())
    ids = random_ids(1, 10)
    mask = np.ones_like(ids)
    mask[0, 3] = 2
    with pytest.raises(ValueError, match=r"attention_mask must contain only 0 and 1"):
        model(ids, attention_mask=mask)


def test_global_count_above_limit_rejected():
    model = build_model(tiny_config(max_global_tokens=4))
    ids = random_ids(1, 10)
    flags = np.zeros_like(ids)
    flags[0, :5] = 1
    with pytest.raises(
        ValueError, match="A row has 5 global tokens but the model has max_global_tokens=4"
    ):
        model(ids, global_attention_mask=flags)


def test_mask_shape_must_match_input_ids():
    model = build_model(tiny_config())
    ids = random_ids(1, 10)
    with pytest.raises(
        ValueError,
        match=r"global_attention_mask has shape \(1, 9\) but input_ids has shape \(1, 10\)",
    ):
        model(ids, global_attention_mask=np.zeros((1, 9), np.int32))


def test_token_type_out_of_range_rejected():
    model = build_model(tiny_config())
    ids = random_ids(1, 10)
    with pytest.raises(ValueError, match=r"token_type_ids contain 1, outside \[0, 1\)"):
        model(ids, token_type_ids=np.ones_like(ids))


# ----------------------------------------------------------------------------------------------
# Different global counts per row, on one device and on a mesh

GLOBAL_ROWS = ([], [0], [*range(16), 50, 199])


def global_batch(rows, length):
    flags = np.zeros((len(rows), length), np.int32)
    for row, positions in enumerate(rows):
        flags[row, positions] = 1
    return flags


@pytest.fixture(scope="module")
def per_row_model():
    return build_model(tiny_config(attention_window=16, max_position_embeddings=258), seed=8)


def test_global_counts_per_row_equal_rows_alone(per_row_model):
    ids = random_ids(3, 200, seed=8)
    flags = global_batch(GLOBAL_ROWS, 200)

    batch = forward(per_row_model, input_ids=ids, global_attention_mask=flags).last_hidden_state

    for row in range(3):
        alone = forward(
            per_row_model, input_ids=ids[row : row + 1], global_attention_mask=flags[row : row + 1]
        )
        np.testing.assert_allclose(
            np.asarray(batch[row]),
            np.asarray(alone.last_hidden_state[0]),
            atol=1e-5,
            err_msg=f"row {row}",
        )


@pytest.mark.slow
def test_global_counts_per_row_on_mesh(per_row_model):
    # The first data shard holds only rows without global tokens.
    rows = [[], [], [], [], [0], GLOBAL_ROWS[2], [], [0]]
    ids = random_ids(8, 200, seed=9)
    flags = global_batch(rows, 200)
    single = forward(per_row_model, input_ids=ids, global_attention_mask=flags).last_hidden_state

    devices = np.asarray(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    inputs = {
        "input_ids": jax.device_put(jnp.asarray(ids), sharding),
        "global_attention_mask": jax.device_put(jnp.asarray(flags), sharding),
    }
    sharded = _forward(per_row_model, inputs).last_hidden_state

    assert len(inputs["input_ids"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-5)
    for row in (0, 4, 5):
        alone = forward(
            per_row_model, input_ids=ids[row : row + 1], global_attention_mask=flags[row : row + 1]
        )
        np.testing.assert_allclose(
            np.asarray(sharded[row]), np.asarray(alone.last_hidden_state[0]), atol=1e-5
        )


# ----------------------------------------------------------------------------------------------
# Position ids and input validation


def test_position_ids_count_from_padding_offset():
    config = tiny_config()
    positions = position_ids_from_input_ids(jnp.asarray([[0, 10, 11, 2, 1, 1]]), config)
    np.testing.assert_array_equal(np.asarray(positions), [[2, 3, 4, 5, 1, 1]])


def test_position_ids_left_padded():
    config = tiny_config()
    positions = position_ids_from_input_ids(jnp.asarray([[1, 1, 0, 10, 2]]), config)
    np.testing.assert_array_equal(np.asarray(positions), [[1, 1, 2, 3, 4]])


def test_position_ids_bert_family_absolute():
    config = tiny_config(family="bert", pad_token_id=0, attention="full", attention_window=())
    positions = position_ids_from_input_ids(jnp.asarray([[101, 7, 102, 0, 0]]), config)
    np.testing.assert_array_equal(np.asarray(positions), [[0, 1, 2, 3, 4]])


def long_config(**changes):
    return tiny_config(attention_window=512, max_position_embeddings=4098, **changes)


def test_position_ids_of_4096_tokens_fit_table():
    config = long_config()
    positions = np.asarray(position_ids_from_input_ids(jnp.asarray(random_ids(1, 4096)), config))
    np.testing.assert_array_equal(positions[0], np.arange(2, 4098))
    assert positions.max() < config.max_position_embeddings


@pytest.fixture(scope="module")
def long_model():
    return build_model(long_config(), seed=10)


def test_4097_tokens_rejected_before_compute(long_model):
    ids = random_ids(1, 4097)
    message = "Input length 4097 exceeds the maximum of 4096 tokens"
    with pytest.raises(ValueError, match=message):
        long_model(ids)
    with pytest.raises(ValueError, match=message):
        forward(long_model, input_ids=ids)


@pytest.mark.slow
def test_4000_tokens_padded_with_pad_position(long_model, monkeypatch):
    seen = []
    original = encoder_module.Embeddings.__call__

    def recording_call(self, input_ids, position_ids, token_type_ids, dropout_rng):
        jax.debug.callback(lambda ids: seen.append(np.asarray(ids)), position_ids)
        return original(self, input_ids, position_ids, token_type_ids, dropout_rng)

    monkeypatch.setattr(encoder_module.Embeddings, "__call__", recording_call)
    ids = random_ids(1, 4000, seed=11)
    out = nnx.jit(lambda model, ids: model(ids).last_hidden_state)(long_model, jnp.asarray(ids))
    jax.effects_barrier()

    assert out.shape == (1, 4000, 32)
    assert np.isfinite(np.asarray(out)).all()
    (positions,) = seen
    assert positions.shape == (1, 4096)
    np.testing.assert_array_equal(positions[0, :4000], np.arange(2, 4002))
    np.testing.assert_array_equal(positions[0, 4000:], 1)


@pytest.mark.parametrize("bad_id", [1000, -1])
def test_token_id_outside_vocabulary_rejected(bad_id):
    model = build_model(tiny_config())
    ids = random_ids(1, 10)
    ids[0, 4] = bad_id
    with pytest.raises(
        ValueError, match=rf"input_ids contain {bad_id}, outside the vocabulary \[0, 1000\)"
    ):
        model(ids)


def test_input_ids_must_be_two_dimensional():
    model = build_model(tiny_config())
    with pytest.raises(
        ValueError, match=r"input_ids must have shape \(batch, length\); got shape \(10,\)"
    ):
        model(np.arange(10))


# ----------------------------------------------------------------------------------------------
# bfloat16 over long rows


@pytest.mark.slow
def test_bfloat16_long_rows_match_float32():
    results = {}
    rng = np.random.default_rng(12)
    ids = random_ids(1, 4096, seed=12)
    flags = np.zeros_like(ids)
    flags[0, rng.choice(4096, size=8, replace=False)] = 1
    masked = jnp.asarray(np.sort(rng.choice(4096, size=256, replace=False))[None])
    labels = jnp.asarray(rng.integers(3, 1000, size=(1, 256)))
    for dtype in ("float32", "bfloat16"):
        # The default initializer range: with 0.2, scores of 30 times the query kernel are so
        # large that bfloat16 rounding flips the argmax of whole attention rows.
        config = long_config(num_layers=2, dtype=dtype, initializer_range=0.02)
        model = build_model(config, "mlm", seed=12)
        for layer in model.encoder.layers:
            for projection in (layer.attention.query, layer.attention.query_global):
                projection.kernel[...] = projection.kernel[...] * 30.0
        out = forward(model, input_ids=ids, global_attention_mask=flags)
        logits = jnp.take_along_axis(out.logits, masked[..., None], axis=1)
        results[dtype] = (
            np.asarray(out.last_hidden_state, np.float32),
            float(masked_lm_loss(logits, labels)),
        )

    hidden_bf16, loss_bf16 = results["bfloat16"]
    hidden_fp32, loss_fp32 = results["float32"]
    assert np.isfinite(hidden_bf16).all()
    assert np.isfinite(loss_bf16)
    relative = np.linalg.norm(hidden_bf16 - hidden_fp32) / np.linalg.norm(hidden_fp32)
    assert relative < 2e-2
    assert abs(loss_bf16 - loss_fp32) / loss_fp32 < 1e-2


# ----------------------------------------------------------------------------------------------
# Layer scan and rematerialisation


@nnx.jit
def _outputs_and_gradients(model, inputs):
    def loss(model):
        hidden = model(**inputs).last_hidden_state
        return jnp.sum(jnp.sin(hidden))

    value, grads = nnx.value_and_grad(loss)(model)
    return model(**inputs).last_hidden_state, value, grads


@pytest.mark.slow
def test_scan_and_remat_match_plain_loop():
    ids = random_ids(2, 21, seed=13)
    flags = np.zeros_like(ids)
    flags[:, 0] = 1
    flags[1, 5] = 1
    inputs = {"input_ids": jnp.asarray(ids), "global_attention_mask": jnp.asarray(flags)}

    def run(**changes):
        model = build_model(tiny_config(num_layers=2, **changes), seed=13)
        hidden, value, grads = _outputs_and_gradients(model, inputs)
        flat = {
            "/".join(map(str, path)): np.asarray(leaf) for path, leaf in nnx.to_flat_state(grads)
        }
        return np.asarray(hidden), float(value), flat

    plain_hidden, plain_value, plain_grads = run()
    for changes in (
        {"scan_layers": True, "remat": "dots"},
        {"remat": "full"},
    ):
        hidden, value, grads = run(**changes)
        np.testing.assert_allclose(hidden, plain_hidden, atol=1e-6, err_msg=str(changes))
        assert value == pytest.approx(plain_value, rel=1e-6), changes
        assert grads.keys() == plain_grads.keys()
        for name, grad in grads.items():
            np.testing.assert_allclose(
                grad, plain_grads[name], rtol=1e-5, atol=1e-5, err_msg=f"{changes} {name}"
            )


def test_scan_layers_needs_one_window():
    model = build_model(tiny_config(num_layers=2, attention_window=(4, 8), scan_layers=True))
    with pytest.raises(
        ValueError, match="scan_layers needs the same attention_window in every layer"
    ):
        model(random_ids(1, 8))


# ----------------------------------------------------------------------------------------------
# Default global attention for question answering


QA_ROW = [0, 11, 12, 13, 2, 2, *range(20, 30), 2, 1, 1]


def test_default_qa_global_mask_covers_question():
    mask = np.asarray(default_qa_global_mask(jnp.asarray([QA_ROW]), tiny_config()))
    assert set(np.flatnonzero(mask[0]).tolist()) == {0, 1, 2, 3}


def test_default_qa_global_mask_per_row():
    rows = np.ones((2, 16), np.int32)
    rows[0, :9] = [0, 11, 12, 13, 2, 2, 40, 41, 2]
    rows[1, :13] = [0, 11, 12, 13, 14, 15, 16, 17, 2, 2, 40, 41, 2]
    mask = np.asarray(default_qa_global_mask(jnp.asarray(rows), tiny_config()))
    assert set(np.flatnonzero(mask[0]).tolist()) == {0, 1, 2, 3}
    assert set(np.flatnonzero(mask[1]).tolist()) == set(range(8))


def test_default_qa_global_mask_without_separator():
    mask = np.asarray(default_qa_global_mask(jnp.asarray([[0, 11, 12, 13, 14]]), tiny_config()))
    np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0]])


def test_qa_default_global_mask_applied():
    config = tiny_config(num_layers=2)
    model = build_model(config, "qa", seed=14)
    ids = np.asarray([QA_ROW])
    mask = (ids != config.pad_token_id).astype(np.int32)
    explicit = np.asarray(default_qa_global_mask(jnp.asarray(ids), config)) * mask

    implicit_out = forward(model, input_ids=ids, attention_mask=mask)
    explicit_out = forward(
        model, input_ids=ids, attention_mask=mask, global_attention_mask=explicit
    )
    local_out = forward(
        model, input_ids=ids, attention_mask=mask, global_attention_mask=np.zeros_like(ids)
    )

    np.testing.assert_array_equal(
        np.asarray(implicit_out.start_logits), np.asarray(explicit_out.start_logits)
    )
    np.testing.assert_array_equal(
        np.asarray(implicit_out.end_logits), np.asarray(explicit_out.end_logits)
    )
    real = mask[0] == 1
    difference = np.abs(np.asarray(implicit_out.start_logits - local_out.start_logits))[0, real]
    assert difference.max() > 1e-4


def test_unknown_head_rejected():
    with pytest.raises(ValueError, match="head='ner' is not supported; use one of"):
        build_model(tiny_config(), "ner")
