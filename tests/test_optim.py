"""Tests for longflax.optim: schedules in update units, AdamW masks and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from longflax import optim
from longflax.sharding import path_names


class Dense(nnx.Module):
    """Linear layer with Flax leaf names and logical axes."""

    def __init__(self, in_features: int, out_features: int, *, rng: np.random.Generator):
        kernel = rng.normal(0.0, 0.5, (in_features, out_features)).astype(np.float32)
        self.kernel = nnx.Param(jnp.asarray(kernel), logical_axes=("embed", "mlp"))
        bias = rng.normal(0.0, 0.1, (out_features,)).astype(np.float32)
        self.bias = nnx.Param(jnp.asarray(bias), logical_axes=("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class Norm(nnx.Module):
    """LayerNorm parameters (`scale`, `bias`) with non-trivial values."""

    def __init__(self, features: int):
        scale = np.linspace(0.5, 1.5, features, dtype=np.float32)
        self.scale = nnx.Param(jnp.asarray(scale), logical_axes=("embed",))
        bias = np.linspace(-0.2, 0.2, features, dtype=np.float32)
        self.bias = nnx.Param(jnp.asarray(bias), logical_axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(variance + 1e-5) * self.scale[...] + self.bias[...]


class TinyModel(nnx.Module):
    """Embedding, a dense layer, a LayerNorm and a global projection."""

    def __init__(self, *, seed: int):
        rng = np.random.default_rng(seed)
        embed = rng.normal(0.0, 1.0, (11, 4)).astype(np.float32)
        self.embed = nnx.Param(jnp.asarray(embed), logical_axes=("vocab", "embed"))
        self.dense = Dense(4, 3, rng=rng)
        self.norm = Norm(3)
        self.query_global = Dense(3, 3, rng=rng)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.norm(self.dense(x + self.embed[...][:1]))
        return self.query_global(hidden)


def split_model(seed: int = 0):
    return nnx.split(TinyModel(seed=seed), nnx.Param)


def regression_loss(graphdef):
    """Return a loss_fn with a summed squared error over the masked tokens."""

    def loss_fn(params, batch, rng):
        del rng
        model = nnx.merge(graphdef, params)
        errors = ((model(batch["x"]) - batch["y"]) ** 2).sum(-1)
        mask = batch["mask"]
        return (errors * mask).sum(), {"num_tokens": mask.sum(), "rows": jnp.float32(1.0)}

    return loss_fn


def regression_batch(batch_size: int = 8, length: int = 5) -> dict[str, jax.Array]:
    rng = np.random.default_rng(1)
    # Micro-batches of 2 rows get 2, 7, 0 and 10 loss tokens: unequal on purpose, one empty.
    lengths = np.array([1, 1, 5, 2, 0, 0, 5, 5])[:batch_size]
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float32)
    return {
        "x": jnp.asarray(rng.normal(size=(batch_size, length, 4)).astype(np.float32)),
        "y": jnp.asarray(rng.normal(size=(batch_size, length, 3)).astype(np.float32)),
        "mask": jnp.asarray(mask),
    }


def find_states(tree, state_type):
    leaves = jax.tree.leaves(tree, is_leaf=lambda node: isinstance(node, state_type))
    return [leaf for leaf in leaves if isinstance(leaf, state_type)]


def optimizer_count(opt_state) -> int:
    (state,) = find_states(opt_state, optax.InjectStatefulHyperparamsState)
    return int(state.count)


def params_by_name(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]
    return {"/".join(path_names(keypath)): np.asarray(leaf) for keypath, leaf in flat}


def make_train_step(tx, loss_fn, num_microbatches):
    @jax.jit
    def train_step(params, opt_state, batch, rng):
        grads, metrics = optim.accumulate_gradients(
            loss_fn, params, batch, num_microbatches=num_microbatches, rng=rng
        )
        params, opt_state, stats = optim.apply_updates(tx, opt_state, params, grads)
        return params, opt_state, stats, metrics

    return train_step


# --- Gradient accumulation ---------------------------------------------------------------


@pytest.fixture(scope="module")
def accumulation_results():
    """Accumulated and reference gradients of one batch, computed in a single jit."""
    graphdef, params = split_model()
    loss_fn = regression_loss(graphdef)
    batch = regression_batch()
    empty_batch = dict(batch, mask=np.zeros(batch["mask"].shape, np.float32))
    rng = jax.random.key(0)

    def big_batch_loss(params):
        sum_loss, aux = loss_fn(params, batch, rng)
        return sum_loss / aux["num_tokens"]

    def compute(params):
        four = optim.accumulate_gradients(loss_fn, params, batch, num_microbatches=4, rng=rng)
        one = optim.accumulate_gradients(loss_fn, params, batch, num_microbatches=1, rng=rng)
        empty = optim.accumulate_gradients(
            loss_fn, params, empty_batch, num_microbatches=4, rng=rng
        )
        expected = jax.value_and_grad(big_batch_loss)(params)
        return {"four": four, "one": one, "empty": empty, "expected": expected}

    return jax.jit(compute)(params)


def test_accumulation_equals_big_batch(accumulation_results):
    grads, metrics = accumulation_results["four"]
    expected_loss, expected_grads = accumulation_results["expected"]
    expected_flat = params_by_name(expected_grads)
    for name, value in params_by_name(grads).items():
        np.testing.assert_allclose(value, expected_flat[name], atol=1e-6, err_msg=name)
    assert float(metrics["num_tokens"]) == 19.0
    assert float(metrics["rows"]) == 4.0
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)


def test_accumulation_single_microbatch_matches_grad(accumulation_results):
    grads, metrics = accumulation_results["one"]
    _, expected_grads = accumulation_results["expected"]
    expected_flat = params_by_name(expected_grads)
    for name, value in params_by_name(grads).items():
        np.testing.assert_allclose(value, expected_flat[name], atol=1e-6, err_msg=name)
    assert float(metrics["rows"]) == 1.0


def test_accumulation_without_tokens_is_zero(accumulation_results):
    grads, metrics = accumulation_results["empty"]
    for name, value in params_by_name(grads).items():
        assert np.all(value == 0.0), name
    assert float(metrics["loss"]) == 0.0
    assert float(metrics["num_tokens"]) == 0.0


def test_accumulation_passes_distinct_rngs():
    _, params = split_model()

    def loss_fn(params, batch, rng):
        value = jax.random.uniform(rng) * jnp.sum(params["dense"]["bias"][...])
        return value, {"num_tokens": jnp.float32(1.0), "draw": jax.random.uniform(rng)}

    def compute(params, rng):
        _, metrics = optim.accumulate_gradients(
            loss_fn, params, {"x": jnp.zeros((4, 1))}, num_microbatches=4, rng=rng
        )
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(4))
        expected = jax.vmap(jax.random.uniform)(keys).sum()
        return metrics["draw"], expected

    draw, expected = jax.jit(compute)(params, jax.random.key(3))
    np.testing.assert_allclose(draw, expected, rtol=1e-6)


# --- Schedules and update counting ---------------------------------------------------------


def schedule_values(schedule, num_updates: int) -> np.ndarray:
    """Evaluate a schedule at update counts 0..num_updates-1 in one compiled call."""
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(num_updates)))


def test_schedule_values_in_updates():
    schedule = optim.make_schedule(peak_learning_rate=1e-3, warmup_steps=10, total_steps=100)
    values = schedule_values(schedule, 151)
    assert values[0] == 0.0
    np.testing.assert_allclose(values[2], 2e-4, rtol=1e-6)
    np.testing.assert_allclose(values[10], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(values[55], 5e-4, rtol=1e-6)
    assert values[99] > 0.0
    assert values[100] == 0.0
    assert values[150] == 0.0
    assert np.all(values >= 0.0)


def test_schedule_constant_and_no_warmup():
    constant = optim.make_schedule(
        peak_learning_rate=1e-3, warmup_steps=4, total_steps=10, decay="constant"
    )
    constant_values = schedule_values(constant, 1001)
    np.testing.assert_allclose(constant_values[2], 5e-4, rtol=1e-6)
    np.testing.assert_allclose(constant_values[1000], 1e-3, rtol=1e-6)
    linear = optim.make_schedule(peak_learning_rate=1e-3, warmup_steps=0, total_steps=10)
    linear_values = schedule_values(linear, 11)
    np.testing.assert_allclose(linear_values[0], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(linear_values[5], 5e-4, rtol=1e-6)
    assert linear_values[10] == 0.0
    # A warm-up as long as the run ends at 0 with no decay phase.
    warmup_only = optim.make_schedule(peak_learning_rate=1e-3, warmup_steps=10, total_steps=10)
    warmup_values = schedule_values(warmup_only, 12)
    np.testing.assert_allclose(warmup_values[5], 5e-4, rtol=1e-6)
    assert warmup_values[10] == 0.0
    assert warmup_values[11] == 0.0


def constant_gradient_setup(num_microbatches: int, *, weight_decay: float = 0.0):
    """A model whose gradient is 0.5 for every parameter, whatever the batch."""
    graphdef, params = split_model()

    def loss_fn(params, batch, rng):
        del rng
        tokens = batch["weight"].sum()
        total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(params))
        return 0.5 * tokens * total, {"num_tokens": tokens}

    schedule = optim.make_schedule(peak_learning_rate=1e-3, warmup_steps=10, total_steps=100)
    tx = optim.make_optimizer(
        params, learning_rate=schedule, weight_decay=weight_decay, max_grad_norm=None
    )
    step = make_train_step(tx, loss_fn, num_microbatches)
    batch = {"weight": np.ones((2 * num_microbatches,), np.float32)}
    return params, tx, step, batch, schedule


@pytest.mark.slow
def test_schedule_counts_updates_not_microbatches():
    num_microbatches = 4
    params, tx, step, batch, schedule = constant_gradient_setup(num_microbatches)
    opt_state = jax.jit(tx.init)(params)
    initial = params_by_name(params)
    history = []
    for update in range(101):
        before = params_by_name(params)
        params, opt_state, stats, _ = step(params, opt_state, batch, jax.random.key(update))
        history.append((before, params_by_name(params), float(stats["learning_rate"])))
        if update == 9:
            # 40 micro-batches are exactly 10 optimizer updates.
            assert optimizer_count(opt_state) == 10

    learning_rates = [lr for _, _, lr in history]
    np.testing.assert_allclose(learning_rates[:10], schedule_values(schedule, 10), rtol=1e-6)

    # The first update uses learning rate 0, so nothing moves.
    for name, value in history[0][1].items():
        np.testing.assert_array_equal(value, initial[name], err_msg=name)

    # The third update (micro-batches 9..12) uses schedule(2) = 2e-4: Adam's step with a
    # constant gradient is -lr * sign(gradient).
    np.testing.assert_allclose(learning_rates[2], 2e-4, rtol=1e-6)
    before, after, _ = history[2]
    for name in before:
        np.testing.assert_allclose(after[name] - before[name], -2e-4, rtol=1e-3, err_msg=name)

    # Update 26 still trains (a schedule counted in micro-batches would have reached 0 at
    # update 25); update 100 (micro-batch 400) is the last non-zero one.
    assert learning_rates[25] > 0.0
    assert learning_rates[99] > 0.0
    assert learning_rates[100] == 0.0
    before, after, _ = history[100]
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert optimizer_count(opt_state) == 101


# --- Weight decay, frozen parameters and clipping -------------------------------------------


def zero_gradient_loss(params, batch, rng):
    del rng
    total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(params))
    return 0.0 * total, {"num_tokens": batch["weight"].sum()}


def test_weight_decay_once_per_update():
    graphdef, params = split_model()
    tx = optim.make_optimizer(params, learning_rate=1e-3, weight_decay=0.1, max_grad_norm=None)
    step = make_train_step(tx, zero_gradient_loss, num_microbatches=4)
    new_params, _, stats, _ = step(
        params, jax.jit(tx.init)(params), {"weight": np.ones((8,), np.float32)}, jax.random.key(0)
    )
    before = params_by_name(params)
    after = params_by_name(new_params)

    np.testing.assert_allclose(stats["learning_rate"], 1e-3, rtol=1e-7)
    for name in ("dense/kernel", "query_global/kernel", "embed"):
        ratio = after[name].astype(np.float64) / before[name]
        np.testing.assert_allclose(ratio, 1.0 - 1e-4, rtol=2e-7, err_msg=name)
        assert not np.allclose(ratio, (1.0 - 1e-4) ** 4, rtol=1e-5), name


def test_weight_decay_skips_bias_and_norm():
    graphdef, params = split_model()
    tx = optim.make_optimizer(params, learning_rate=1e-3, weight_decay=0.1)
    step = make_train_step(tx, zero_gradient_loss, num_microbatches=4)
    new_params, _, _, _ = step(
        params, jax.jit(tx.init)(params), {"weight": np.ones((8,), np.float32)}, jax.random.key(0)
    )
    before = params_by_name(params)
    after = params_by_name(new_params)
    for name in ("dense/bias", "norm/scale", "norm/bias", "query_global/bias"):
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_is_decayed_by_leaf_name():
    assert optim.is_decayed(("dense", "kernel"))
    assert optim.is_decayed(("embeddings", "word", "embedding"))
    assert not optim.is_decayed(("dense", "bias"))
    assert not optim.is_decayed(("norm", "scale"))


def test_frozen_leaves_unchanged_and_unallocated():
    graphdef, params = split_model()
    tx = optim.make_optimizer(
        params,
        learning_rate=1e-2,
        weight_decay=0.1,
        frozen=lambda path: "query_global" in path,
    )
    step = make_train_step(tx, regression_loss(graphdef), num_microbatches=2)
    batch = regression_batch()
    opt_state = jax.jit(tx.init)(params)
    initial = params_by_name(params)
    for update in range(3):
        params, opt_state, _, _ = step(params, opt_state, batch, jax.random.key(update))
    final = params_by_name(params)

    for name in ("query_global/kernel", "query_global/bias"):
        np.testing.assert_array_equal(final[name], initial[name], err_msg=name)
    for name in ("dense/kernel", "dense/bias", "embed", "norm/scale"):
        assert not np.array_equal(final[name], initial[name]), name

    (adam_state,) = find_states(opt_state, optax.ScaleByAdamState)
    moment_names = set(params_by_name(adam_state.mu))
    assert moment_names == {"embed", "dense/kernel", "dense/bias", "norm/scale", "norm/bias"}


def test_clipping_ignores_frozen_gradients():
    graphdef, params = split_model()
    # With eps=1 Adam's first step is g / (|g| + 1), so clipping the gradient shows up.
    tx = optim.make_optimizer(
        params,
        learning_rate=1.0,
        eps=1.0,
        max_grad_norm=1.0,
        frozen=lambda path: "query_global" in path,
    )
    grads = jax.tree.map(np.zeros_like, params)
    grads["dense"]["bias"][...] = np.full((3,), 0.1, np.float32)
    grads["query_global"]["kernel"][...] = np.full((3, 3), 1000.0, np.float32)
    apply = jax.jit(lambda p, g: optim.apply_updates(tx, tx.init(p), p, g))
    new_params, _, stats = apply(params, grads)

    delta = params_by_name(new_params)["dense/bias"] - params_by_name(params)["dense/bias"]
    np.testing.assert_allclose(delta, -0.1 / 1.1, rtol=1e-5)
    np.testing.assert_allclose(stats["grad_norm"], np.sqrt(0.03 + 9 * 1000.0**2), rtol=1e-6)


def test_apply_updates_stats():
    graphdef, params = split_model()
    tx = optim.make_optimizer(params, learning_rate=0.1, max_grad_norm=None)
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    apply = jax.jit(lambda p, g: optim.apply_updates(tx, tx.init(p), p, g))
    new_params, opt_state, stats = apply(params, grads)
    num_values = sum(leaf.size for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(stats["grad_norm"], 0.5 * np.sqrt(num_values), rtol=1e-6)
    np.testing.assert_allclose(stats["update_norm"], 0.1 * np.sqrt(num_values), rtol=1e-5)
    np.testing.assert_allclose(stats["param_norm"], optax.tree.norm(new_params), rtol=1e-6)
    np.testing.assert_allclose(stats["learning_rate"], 0.1, rtol=1e-7)
    np.testing.assert_allclose(optim.current_learning_rate(opt_state), 0.1, rtol=1e-7)


# --- Error messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decay="cosine"), r"decay='cosine' is invalid: use 'linear' or 'constant'"),
        (dict(peak_learning_rate=-1.0), r"peak_learning_rate=-1.0 is invalid: it must be >= 0"),
        (dict(warmup_steps=-1), r"warmup_steps=-1 is invalid: it must be >= 0"),
        (dict(total_steps=0, warmup_steps=0), r"total_steps=0 is invalid: it must be > 0"),
        (
            dict(warmup_steps=101, total_steps=100),
            r"warmup_steps=101 is longer than total_steps=100: reduce warmup_steps",
        ),
        (
            dict(warmup_steps=101, total_steps=100, decay="constant"),
            r"warmup_steps=101 is longer than total_steps=100",
        ),
    ],
)
def test_make_schedule_errors(kwargs, message):
    arguments = dict(peak_learning_rate=1e-3, warmup_steps=10, total_steps=100)
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        optim.make_schedule(**arguments)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(b1=1.0), r"b1=1.0 is invalid: it must be in \[0, 1\)"),
        (dict(b2=-0.1), r"b2=-0.1 is invalid: it must be in \[0, 1\)"),
        (dict(eps=0.0), r"eps=0.0 is invalid: it must be > 0"),
        (dict(weight_decay=-0.01), r"weight_decay=-0.01 is invalid: it must be >= 0"),
        (dict(max_grad_norm=0.0), r"max_grad_norm=0.0 is invalid: it must be > 0, or None"),
        (dict(frozen=lambda path: True), r"Every parameter is frozen"),
    ],
)
def test_make_optimizer_errors(kwargs, message):
    _, params = split_model()
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(params, learning_rate=1e-3, **kwargs)


def test_accumulate_gradients_errors():
    graphdef, params = split_model()
    loss_fn = regression_loss(graphdef)
    batch = regression_batch()
    rng = jax.random.key(0)

    with pytest.raises(ValueError, match=r"num_microbatches=0 is invalid: it must be >= 1"):
        optim.accumulate_gradients(loss_fn, params, batch, num_microbatches=0, rng=rng)
    with pytest.raises(ValueError, match=r"Batch size 8 is not divisible by num_microbatches=3"):
        optim.accumulate_gradients(loss_fn, params, batch, num_microbatches=3, rng=rng)
    with pytest.raises(ValueError, match=r"The batch contains no arrays"):
        optim.accumulate_gradients(loss_fn, params, {}, num_microbatches=1, rng=rng)
    uneven = dict(batch, mask=batch["mask"][:4])
    with pytest.raises(ValueError, match=r"leading dimensions \[4, 8\]: every array needs"):
        optim.accumulate_gradients(loss_fn, params, uneven, num_microbatches=2, rng=rng)

    def no_tokens(params, batch, rng):
        return jnp.float32(0.0), {"tokens": jnp.float32(1.0)}

    with pytest.raises(ValueError, match=r"aux keys \['tokens'\] without 'num_tokens'"):
        optim.accumulate_gradients(no_tokens, params, batch, num_microbatches=2, rng=rng)


def test_current_learning_rate_error():
    _, params = split_model()
    opt_state = optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match=r"no injected learning_rate: build the optimizer"):
        optim.current_learning_rate(opt_state)
