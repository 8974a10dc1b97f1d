"""Optimiser, learning-rate schedules and gradient accumulation.

All step counts here are optimizer updates, not micro-batches. `accumulate_gradients` folds the
micro-batches of one update into a single gradient inside one jitted call. So the optimizer
count, the schedule, weight decay and the trainer's step number all advance once per update.

Parameter trees are usually the `nnx.State` from `nnx.split(model, nnx.Param)`, but any pytree
of arrays works. Leaf paths are tuples of strings, for example
`("encoder", "layers", "0", "attention", "query_global", "kernel")` (see
`longflax.sharding.path_names`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longflax.sharding import path_names

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]

# Leaf names that never get weight decay: Linear/LayerNorm `bias` and LayerNorm `scale`.
# Kernels and embedding tables (word, position and token-type) are decayed, as in the
# original BERT and RoBERTa AdamW setup.
NO_DECAY_LEAF_NAMES = frozenset({"bias", "scale"})

_TRAINABLE = "trainable"
_FROZEN = "frozen"


def make_schedule(
    *,
    peak_learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    decay: Literal["linear", "constant"] = "linear",
) -> optax.Schedule:
    """Build a learning-rate schedule counted in optimizer updates.

    The rate rises linearly from 0 at update 0 to `peak_learning_rate` at update
    `warmup_steps`. With `decay="linear"` it then falls linearly to 0 at update `total_steps`
    and stays 0 afterwards. With `decay="constant"` it stays at the peak. Because warm-up
    starts at 0, the first update of a run with `warmup_steps > 0` changes no parameter (AdamW
    scales weight decay by the learning rate too).

    Args:
        peak_learning_rate: Maximum learning rate, >= 0.
        warmup_steps: Number of warm-up updates, >= 0.
        total_steps: Total number of updates of the run, > 0.
        decay: "linear" (to 0 at `total_steps`) or "constant".

    Returns:
        A function from the optimizer update count to the learning rate.

    Raises:
        ValueError: If a value is out of range, `decay` is unknown or the warm-up does not fit
            into `total_steps`.
    """
    if decay not in ("linear", "constant"):
        raise ValueError(f"decay={decay!r} is invalid: use 'linear' or 'constant'.")
    if peak_learning_rate < 0:
        raise ValueError(f"peak_learning_rate={peak_learning_rate} is invalid: it must be >= 0.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} is invalid: it must be >= 0.")
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps} is invalid: it must be > 0.")
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps} is longer than total_steps={total_steps}: reduce "
            "warmup_steps or increase total_steps (both count optimizer updates, not "
            "micro-batches)."
        )

    if decay == "linear":
        decay_steps = total_steps - warmup_steps

        def after_warmup(count: jax.Array) -> jax.Array:
            # optax.linear_schedule (0.2.8) computes 1 - count / steps. Under jit XLA may use a
            # reciprocal there and return a tiny negative learning rate at the last update,
            # while (steps - count) / steps is exactly 0.
            remaining = jnp.clip(decay_steps - count, 0, decay_steps)
            return peak_learning_rate * (remaining.astype(jnp.float32) / max(decay_steps, 1))

    else:
        after_warmup = optax.constant_schedule(peak_learning_rate)
    if warmup_steps == 0:
        return after_warmup
    warmup = optax.linear_schedule(0.0, peak_learning_rate, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, after_warmup], boundaries=[warmup_steps])


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def _map_with_names(fn: Callable[[tuple[str, ...]], Any], params: PyTree) -> PyTree:
    """Map each parameter leaf (an array or an `nnx.Variable`) to `fn(path)`.

    The result has a leaf where `params` has a Variable, so it is a pytree prefix of `params`,
    which `optax.masked` and `optax.multi_transform` accept.
    """
    return jax.tree_util.tree_map_with_path(
        lambda keypath, _: fn(path_names(keypath)), params, is_leaf=_is_variable
    )


def is_decayed(path: tuple[str, ...]) -> bool:
    """Return whether AdamW weight decay applies to the parameter at `path`."""
    return not path or path[-1] not in NO_DECAY_LEAF_NAMES


def make_optimizer(
    params: PyTree,
    *,
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    frozen: Callable[[tuple[str, ...]], bool] | None = None,
) -> optax.GradientTransformation:
    """Build AdamW with global-norm clipping, a weight-decay mask and frozen parameters.

    Decay applies to every trainable leaf except those named `bias` or `scale` (so kernels and
    embedding tables are decayed). Leaves for which `frozen(path)` is true get exactly zero
    updates and no decay, and the optimizer state contains no moments for them. Clipping uses the
    global norm of the trainable gradients only. The whole transformation is wrapped in
    `optax.inject_hyperparams`, so `current_learning_rate(opt_state)` returns the learning
    rate of the latest update.

    Args:
        params: The parameter tree (values are not read, only the leaf paths).
        learning_rate: A constant or a schedule over optimizer updates (see `make_schedule`).
        b1: Adam decay rate of the first moment, in [0, 1).
        b2: Adam decay rate of the second moment, in [0, 1).
        eps: Adam epsilon added to the root of the second moment, > 0.
        weight_decay: Decoupled weight-decay coefficient, >= 0 (multiplied by the learning
            rate, as in `optax.adamw`).
        max_grad_norm: Clip gradients to this global norm, > 0, or None for no clipping.
        frozen: Optional predicate on a leaf path; true means the leaf is not trained.

    Returns:
        The gradient transformation.

    Raises:
        ValueError: If a hyperparameter is out of range or every parameter is frozen.
    """
    if not 0.0 <= b1 < 1.0:
        raise ValueError(f"b1={b1} is invalid: it must be in [0, 1).")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2={b2} is invalid: it must be in [0, 1).")
    if eps <= 0:
        raise ValueError(f"eps={eps} is invalid: it must be > 0.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} is invalid: it must be >= 0.")
    if max_grad_norm is not None and max_grad_norm <= 0:
        raise ValueError(
            f"max_grad_norm={max_grad_norm} is invalid: it must be > 0, or None to disable "
            "clipping."
        )

    is_frozen = frozen if frozen is not None else (lambda path: False)
    labels = _map_with_names(lambda path: _FROZEN if is_frozen(path) else _TRAINABLE, params)
    if _TRAINABLE not in jax.tree.leaves(labels):
        raise ValueError(
            "Every parameter is frozen: the `frozen` predicate returned True for all leaf "
            "paths, so there is nothing to train. Check the predicate."
        )
    decay_mask = _map_with_names(is_decayed, params)

    def build(learning_rate: jax.Array) -> optax.GradientTransformation:
        trainable = [
            optax.adamw(
                learning_rate,
                b1=b1,
                b2=b2,
                eps=eps,
                weight_decay=weight_decay,
                mask=decay_mask,
            )
        ]
        if max_grad_norm is not None:
            trainable.insert(0, optax.clip_by_global_norm(max_grad_norm))
        return optax.multi_transform(
            {_TRAINABLE: optax.chain(*trainable), _FROZEN: optax.set_to_zero()}, labels
        )

    return optax.inject_hyperparams(build)(learning_rate=learning_rate)


def current_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """Return the learning rate that the latest update used.

    Before the first update this is the schedule's value at count 0.

    Raises:
        ValueError: If the state has no injected `learning_rate` hyperparameter.
    """
    injected_types = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
    states = jax.tree.leaves(opt_state, is_leaf=lambda node: isinstance(node, injected_types))
    for state in states:
        if isinstance(state, injected_types) and "learning_rate" in state.hyperparams:
            return state.hyperparams["learning_rate"]
    raise ValueError(
        "The optimizer state has no injected learning_rate: build the optimizer with "
        "make_optimizer or wrap it in optax.inject_hyperparams."
    )


def accumulate_gradients(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    num_microbatches: int,
    rng: jax.Array,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Compute the token-averaged gradient of a batch in `num_microbatches` sequential parts.

    `loss_fn(params, microbatch, rng)` returns `(sum_loss, aux)`, where `sum_loss` is the loss
    summed (not averaged) over the micro-batch's loss tokens and `aux["num_tokens"]` counts
    those tokens. The result is the gradient of `sum(sum_loss) / sum(num_tokens)` over all
    micro-batches, which equals the big-batch gradient even when the micro-batches hold
    different numbers of tokens. A batch with no loss tokens gives a zero gradient, not NaN.

    The micro-batches run under `jax.lax.scan` with one gradient buffer in float32 (or wider),
    so memory stays at one micro-batch of activations plus one gradient.

    Args:
        loss_fn: The loss function described above. Every `aux` value is summed.
        params: The parameter tree to differentiate.
        batch: A pytree of arrays with a shared leading batch dimension B.
        num_microbatches: Number of micro-batches k; B must be divisible by k.
        rng: A PRNG key; micro-batch i gets `jax.random.fold_in(rng, i)`.

    Returns:
        `(grads, metrics)`: grads has the structure and dtypes of `params`, and metrics contains every
        `aux` value summed over micro-batches plus `sum_loss` and `loss` (the token average).

    Raises:
        ValueError: If `num_microbatches` is not positive, the batch is empty or its leading
            dimensions differ or are not divisible by `num_microbatches`, or `aux` lacks
            `num_tokens`.
    """
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches={num_microbatches} is invalid: it must be >= 1.")
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("The batch contains no arrays: pass a pytree of batch arrays.")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Batch arrays have leading dimensions {sorted(sizes, key=str)}: every array needs "
            "the same leading batch dimension."
        )
    batch_size = sizes.pop()
    if batch_size % num_microbatches:
        raise ValueError(
            f"Batch size {batch_size} is not divisible by num_microbatches={num_microbatches}: "
            "choose a batch size that is a multiple of num_microbatches."
        )

    microbatch_size = batch_size // num_microbatches
    microbatches = jax.tree.map(
        lambda x: x.reshape((num_microbatches, microbatch_size) + x.shape[1:]), batch
    )

    # Tracing one micro-batch gives the names and shapes of the metrics to sum.
    sum_loss_shape, aux_shapes = jax.eval_shape(
        loss_fn, params, jax.tree.map(lambda x: x[0], microbatches), rng
    )
    if "num_tokens" not in aux_shapes:
        raise ValueError(
            f"loss_fn returned aux keys {sorted(aux_shapes)} without 'num_tokens': return "
            "the number of loss tokens as aux['num_tokens']."
        )
    metric_shapes = {"sum_loss": sum_loss_shape, **aux_shapes}

    def zeros_for_sum(x: Any) -> jax.Array:
        return jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))

    value_and_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def add_microbatch(carry, inputs):
        grad_sums, metric_sums = carry
        index, microbatch = inputs
        (sum_loss, aux), grads = value_and_grad_fn(
            params, microbatch, jax.random.fold_in(rng, index)
        )
        grad_sums = jax.tree.map(lambda total, g: total + g.astype(total.dtype), grad_sums, grads)
        metrics = {"sum_loss": sum_loss, **aux}
        metric_sums = jax.tree.map(
            lambda total, m: total + m.astype(total.dtype), metric_sums, metrics
        )
        return (grad_sums, metric_sums), None

    (grad_sums, metric_sums), _ = jax.lax.scan(
        add_microbatch,
        (jax.tree.map(zeros_for_sum, params), jax.tree.map(zeros_for_sum, metric_shapes)),
        (jnp.arange(num_microbatches), microbatches),
    )

    # Dividing by max(tokens, 1) keeps a batch without loss tokens finite (its sum is 0).
    denominator = jnp.maximum(metric_sums["num_tokens"].astype(jnp.float32), 1.0)
    grads = jax.tree.map(lambda total, p: (total / denominator).astype(p.dtype), grad_sums, params)
    metrics = dict(metric_sums)
    metrics["loss"] = metric_sums["sum_loss"] / denominator
    return grads, metrics


def apply_updates(
    tx: optax.GradientTransformation,
    opt_state: optax.OptState,
    params: PyTree,
    grads: PyTree,
) -> tuple[PyTree, optax.OptState, dict[str, jax.Array]]:
    """Apply one optimizer update and return statistics for logging.

    Args:
        tx: The optimizer, built by `make_optimizer` (or wrapped in `optax.inject_hyperparams`).
        opt_state: The optimizer state.
        params: The current parameters.
        grads: Gradients with the structure of `params`, before clipping.

    Returns:
        `(params, opt_state, stats)` where stats contains `grad_norm` (global norm of `grads`
        before clipping, frozen leaves included), `update_norm`, `param_norm` (of the new
        parameters) and `learning_rate` (the rate this update used).

    Raises:
        ValueError: If the optimizer state exposes no learning rate.
    """
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    stats = {
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(new_params),
        "learning_rate": current_learning_rate(opt_state),
    }
    return new_params, opt_state, stats
