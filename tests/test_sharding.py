"""Tests for longflax.sharding on the 8 fake CPU devices set up by conftest.py."""

import logging as std_logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from longflax import optim, sharding

EMBED = 16
HEADS = 32
MLP = 48


def param(rng: np.random.Generator, shape, logical_axes, scale: float = 0.2) -> nnx.Param:
    value = rng.normal(0.0, scale, shape).astype(np.float32)
    return nnx.Param(jnp.asarray(value), logical_axes=logical_axes)


class Dense(nnx.Module):
    def __init__(self, rng, in_features, out_features, in_axis, out_axis):
        self.kernel = param(rng, (in_features, out_features), (in_axis, out_axis))
        self.bias = param(rng, (out_features,), (out_axis,))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]


class LayerNorm(nnx.Module):
    def __init__(self, features):
        self.scale = nnx.Param(jnp.ones((features,)), logical_axes=("embed",))
        self.bias = nnx.Param(jnp.zeros((features,)), logical_axes=("embed",))

    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(variance + 1e-5) * self.scale[...] + self.bias[...]


class TinyMaskedLM(nnx.Module):
    """Word and position embeddings, one attention-shaped and one MLP block, tied decoder."""

    def __init__(self, *, vocab_size: int = 1002, max_positions: int = 66, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.word_embeddings = param(rng, (vocab_size, EMBED), ("vocab", "embed"), 1.0)
        self.position_embeddings = param(rng, (max_positions, EMBED), ("positions", "embed"))
        self.query = Dense(rng, EMBED, HEADS, "embed", "heads")
        self.query_global = Dense(rng, EMBED, HEADS, "embed", "heads")
        self.attention_output = Dense(rng, HEADS, EMBED, "heads", "embed")
        self.intermediate = Dense(rng, EMBED, MLP, "embed", "mlp")
        self.output = Dense(rng, MLP, EMBED, "mlp", "embed")
        self.norm = LayerNorm(EMBED)
        self.lm_dense = Dense(rng, EMBED, EMBED, "embed", "embed")
        self.lm_bias = nnx.Param(jnp.zeros((vocab_size,)), logical_axes=("vocab",))

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])
        hidden = self.word_embeddings[...][input_ids] + self.position_embeddings[...][positions]
        hidden = hidden + self.attention_output(jnp.tanh(self.query(hidden)))
        hidden = self.norm(hidden + self.output(jax.nn.gelu(self.intermediate(hidden))))
        hidden = jnp.tanh(self.lm_dense(hidden))
        return hidden @ self.word_embeddings[...].T + self.lm_bias[...]


def masked_lm_loss(graphdef, params, input_ids, labels):
    logits = nnx.merge(graphdef, params)(input_ids)
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1).mean()


def abstract_params(**kwargs):
    graphdef, params = nnx.split(TinyMaskedLM(**kwargs), nnx.Param)
    return graphdef, params, jax.eval_shape(lambda: params)


def specs_by_name(shardings) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    return {"/".join(sharding.path_names(keypath)): leaf.spec for keypath, leaf in flat}


# --- make_mesh ------------------------------------------------------------------------------


def test_make_mesh_fills_missing_axes():
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_resolves_minus_one():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    assert mesh.devices.size == 4


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"model": 8}, r"Unknown mesh axis names \['model'\]: use only \['data', 'fsdp', "),
        ({"data": 0, "tensor": -1}, r"Invalid mesh axis sizes \{'data': 0\}: each size must be"),
        ({"data": -2}, r"Invalid mesh axis sizes \{'data': -2\}"),
        ({"data": -1, "tensor": -1}, r"Mesh axes \['data', 'tensor'\] are all -1"),
        ({"data": -1, "tensor": 3}, r"Cannot infer mesh axis 'data': 8 devices are not divisible"),
        ({"data": 2, "tensor": 2}, r"Mesh shape .* has 4 devices, but 8 are available"),
    ],
)
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.make_mesh(shape)


# --- Logical axis rules ---------------------------------------------------------------------


def test_param_shardings_fsdp_tensor_mesh():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    _, params, abstract = abstract_params()
    shardings = sharding.param_shardings(abstract, mesh)
    specs = specs_by_name(shardings)

    # The 1002-row vocabulary is not divisible by the tensor axis of 4, so it is replicated.
    assert specs["word_embeddings"] == P(None, "fsdp")
    assert specs["lm_bias"] == P(None)
    assert specs["position_embeddings"] == P(None, "fsdp")
    assert specs["query/kernel"] == P("fsdp", "tensor")
    assert specs["query/bias"] == P("tensor")
    assert specs["query_global/kernel"] == P("fsdp", "tensor")
    assert specs["attention_output/kernel"] == P("tensor", "fsdp")
    assert specs["intermediate/kernel"] == P("fsdp", "tensor")
    assert specs["output/kernel"] == P("tensor", "fsdp")
    assert specs["norm/scale"] == P("fsdp")
    # Both dimensions map to fsdp; a mesh axis can shard only one of them.
    assert specs["lm_dense/kernel"] == P("fsdp", None)

    placed = jax.device_put(params, shardings)
    query_kernel = placed["query"]["kernel"][...]
    assert {shard.data.shape for shard in query_kernel.addressable_shards} == {(8, 8)}
    output_kernel = placed["output"]["kernel"][...]
    assert {shard.data.shape for shard in output_kernel.addressable_shards} == {(12, 8)}


def test_param_shardings_data_tensor_mesh():
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    _, _, abstract = abstract_params(vocab_size=1000)
    specs = specs_by_name(sharding.param_shardings(abstract, mesh))
    assert specs["word_embeddings"] == P("tensor", "fsdp")
    assert specs["intermediate/kernel"] == P("fsdp", "tensor")
    assert specs["intermediate/bias"] == P("tensor")


def test_indivisible_dimension_logged_once(caplog):
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    caplog.set_level(std_logging.INFO)
    for _ in range(3):
        result = sharding.logical_to_sharding(
            ("vocab", "embed"), (250002, 16), mesh, name="test/xlmr_vocab"
        )
        assert result.spec == P(None, "fsdp")
    messages = [record.getMessage() for record in caplog.records]
    fallbacks = [message for message in messages if "test/xlmr_vocab" in message]
    assert len(fallbacks) == 1
    assert "size 250002" in fallbacks[0]
    assert "not divisible by mesh axes ('tensor',)" in fallbacks[0]


def test_indivisible_batch_uses_divisible_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    full = sharding.logical_to_sharding(("batch", "length"), (16, 8), mesh, name="test/b16")
    assert full.spec == P(("data", "fsdp"), None)
    partial = sharding.logical_to_sharding(("batch", "length"), (6, 8), mesh, name="test/b6")
    assert partial.spec == P("data", None)


def test_logical_to_sharding_errors():
    mesh = sharding.make_mesh({"data": 8})
    with pytest.raises(
        ValueError, match=r"Parameter enc/kernel has logical_axes \('embed',\) for shape \(4, 4\)"
    ):
        sharding.logical_to_sharding(("embed",), (4, 4), mesh, name="enc/kernel")
    with pytest.raises(ValueError, match=r"uses unknown logical axis 'hidden': use one of"):
        sharding.logical_to_sharding(("hidden",), (4,), mesh, name="enc/bias")


def test_param_shardings_errors():
    mesh = sharding.make_mesh({"data": 8})

    class Unannotated(nnx.Module):
        def __init__(self):
            self.kernel = nnx.Param(jnp.zeros((2, 2)))

    state = nnx.state(Unannotated(), nnx.Param)
    with pytest.raises(ValueError, match=r"Parameter kernel has no logical_axes metadata"):
        sharding.param_shardings(state, mesh)
    with pytest.raises(ValueError, match=r"Leaf kernel is a ndarray, not an nnx.Variable"):
        sharding.param_shardings({"kernel": np.zeros((2, 2))}, mesh)


def test_optimizer_state_follows_params():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    _, params, abstract = abstract_params()
    tx = optim.make_optimizer(
        params, learning_rate=1e-3, frozen=lambda path: "query_global" in path
    )
    params_shardings = sharding.param_shardings(abstract, mesh)
    state_shapes = jax.eval_shape(tx.init, abstract)
    state_shardings = sharding.optimizer_state_shardings(state_shapes, params_shardings, mesh)

    leaves = jax.tree.leaves(
        state_shardings, is_leaf=lambda node: isinstance(node, optax.ScaleByAdamState)
    )
    (adam,) = [leaf for leaf in leaves if isinstance(leaf, optax.ScaleByAdamState)]
    expected = specs_by_name(params_shardings)
    del expected["query_global/kernel"], expected["query_global/bias"]
    assert specs_by_name(adam.mu) == expected
    assert specs_by_name(adam.nu) == expected
    assert adam.count.spec == P()

    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(
        jax.device_put(params, params_shardings)
    )
    (placed,) = [
        leaf
        for leaf in jax.tree.leaves(
            opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByAdamState)
        )
        if isinstance(leaf, optax.ScaleByAdamState)
    ]
    assert placed.mu["intermediate"]["kernel"][...].sharding.spec == P("fsdp", "tensor")


# --- Vocabulary not divisible by the tensor axis --------------------------------------------


@pytest.mark.slow
def test_vocab_1002_loss_matches_unsharded():
    graphdef, params, abstract = abstract_params(vocab_size=1002)
    rng = np.random.default_rng(5)
    input_ids = rng.integers(0, 1002, (8, 12)).astype(np.int32)
    labels = rng.integers(0, 1002, (8, 12)).astype(np.int32)
    loss_fn = jax.jit(lambda p, x, y: masked_lm_loss(graphdef, p, x, y))

    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    expected = loss_fn(jax.device_put(params, single), input_ids, labels)

    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    shardings = sharding.param_shardings(abstract, mesh)
    sharded_params = jax.device_put(params, shardings)
    batch = sharding.shard_batch({"input_ids": input_ids, "labels": labels}, mesh)
    loss = loss_fn(sharded_params, batch["input_ids"], batch["labels"])

    assert sharded_params["word_embeddings"][...].shape == (1002, EMBED)
    assert sharded_params["word_embeddings"][...].sharding.spec == P(None, "fsdp")
    np.testing.assert_allclose(loss, expected, atol=1e-5)

    logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(sharded_params, batch["input_ids"])
    assert logits.shape == (8, 12, 1002)


# --- Batches --------------------------------------------------------------------------------


def test_batch_sharding_spec():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_pad_batch_repeats_last_row():
    batch = {"ids": np.arange(10).reshape(5, 2), "weight": np.ones(5, np.float32)}
    padded, valid = sharding.pad_batch(batch, 4)
    assert padded["ids"].shape == (8, 2)
    np.testing.assert_array_equal(padded["ids"][5:], [[8, 9]] * 3)
    np.testing.assert_array_equal(valid, [True] * 5 + [False] * 3)

    unchanged, valid = sharding.pad_batch(batch, 5)
    np.testing.assert_array_equal(unchanged["ids"], batch["ids"])
    assert valid.all()


def test_evaluation_keeps_all_19_rows():
    graphdef, params, _ = abstract_params(vocab_size=1000)
    rng = np.random.default_rng(9)
    input_ids = rng.integers(0, 1000, (19, 12)).astype(np.int32)
    predict = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x).max(-1))

    expected = np.asarray(predict(params, input_ids))

    mesh = sharding.make_mesh({"data": 4}, devices=jax.devices()[:4])
    padded, valid = sharding.pad_batch({"input_ids": input_ids}, 4)
    batch = sharding.shard_batch(padded, mesh)
    assert batch["input_ids"].shape == (20, 12)
    assert len(batch["input_ids"].addressable_shards) == 4
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    result = np.asarray(predict(replicated, batch["input_ids"]))[valid]

    assert result.shape == (19, 12)
    np.testing.assert_allclose(result, expected, atol=1e-6)


def test_shard_batch_errors():
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    with pytest.raises(
        ValueError,
        match=r"Global batch size 19 is not divisible by the 4 batch shards .* pad_batch",
    ):
        sharding.shard_batch({"ids": np.zeros((19, 3))}, mesh)
    with pytest.raises(ValueError, match=r"Batch entries \['step'\] are scalars"):
        sharding.shard_batch({"ids": np.zeros((4, 3)), "step": np.int32(1)}, mesh)
    with pytest.raises(ValueError, match=r"different leading dimensions \{'a': 4, 'b': 8\}"):
        sharding.shard_batch({"a": np.zeros((4,)), "b": np.zeros((8,))}, mesh)


def test_pad_batch_errors():
    with pytest.raises(ValueError, match=r"multiple=0 is invalid: it must be >= 1"):
        sharding.pad_batch({"ids": np.zeros((3,))}, 0)
    with pytest.raises(ValueError, match=r"The batch is empty: pad_batch needs at least one row"):
        sharding.pad_batch({"ids": np.zeros((0, 2))}, 4)
    with pytest.raises(ValueError, match=r"leading dimensions \[2, 3\]: every array needs"):
        sharding.pad_batch({"a": np.zeros((2,)), "b": np.zeros((3,))}, 4)


def test_path_names_drop_variable_value():
    state = nnx.state(TinyMaskedLM(vocab_size=8, max_positions=4), nnx.Param)
    flat_variables = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda node: isinstance(node, nnx.Variable)
    )[0]
    flat_arrays = jax.tree_util.tree_flatten_with_path(state)[0]
    names_from_variables = [sharding.path_names(keypath) for keypath, _ in flat_variables]
    names_from_arrays = [sharding.path_names(keypath) for keypath, _ in flat_arrays]
    assert names_from_variables == names_from_arrays
    assert ("query_global", "kernel") in names_from_arrays
