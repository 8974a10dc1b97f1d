"""Device meshes and the mapping from logical axis names to mesh axes.

Model code names the dimensions of parameters and activations with logical axes (`batch`,
`length`, `embed`, `heads`, `mlp`, `vocab`, `positions`, `types`, `labels`), stored as the
`logical_axes` metadata of every `nnx.Param`. `LOGICAL_AXIS_RULES` is the single table that maps
those names to the mesh axes `data`, `fsdp` and `tensor`, so model code never names a mesh axis.

A dimension whose size is not divisible by the mesh axes it maps to is replicated instead (a
250002-row XLM-R vocabulary over a tensor axis of 4, for example), and the fallback is logged
once per leaf.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
MeshAxes = str | tuple[str, ...] | None

MESH_AXIS_NAMES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: Mapping[str, MeshAxes] = types.MappingProxyType(
    {
        "batch": ("data", "fsdp"),
        "length": None,
        "embed": "fsdp",
        # The fused heads x head_dim dimension of the q/k/v and attention-output kernels.
        "heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
        "positions": None,
        "types": None,
        "labels": None,
    }
)

# (leaf name, dimension, size, mesh axes) of every replication fallback already logged.
_LOGGED_FALLBACKS: set[tuple[str, int, int, tuple[str, ...]]] = set()


def key_name(key: Any) -> str:
    """Return the name of one JAX key-path entry: a dict key, attribute or sequence index."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_names(keypath: Sequence[Any]) -> tuple[str, ...]:
    """Convert a JAX key path to a tuple of names, e.g. `("layers", "0", "mlp", "kernel")`.

    The trailing `.value` attribute that flattening an `nnx.Variable` adds is dropped, so a
    parameter has the same path whether or not its Variable wrapper was flattened.
    """
    names = [key_name(key) for key in keypath]
    if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names.pop()
    return tuple(names)


def make_mesh(shape: Mapping[str, int], *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a mesh with axes ("data", "fsdp", "tensor") over all (or the given) devices.

    Args:
        shape: Size per axis name; missing axes get size 1 and one size may be -1, meaning
            all remaining devices. Example: `{"data": -1, "tensor": 4}`.
        devices: Devices to use; defaults to `jax.devices()`.

    Returns:
        A mesh whose axes are all `AxisType.Auto`, so jit and sharding constraints behave as
        in GSPMD (`jax.make_mesh` in jax 0.10 defaults to Explicit axes).

    Raises:
        ValueError: If an axis name is unknown, a size is invalid, or the sizes do not
            multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(MESH_AXIS_NAMES))
    if unknown:
        raise ValueError(f"Unknown mesh axis names {unknown}: use only {list(MESH_AXIS_NAMES)}.")
    sizes = {name: int(shape.get(name, 1)) for name in MESH_AXIS_NAMES}
    invalid = {name: size for name, size in sizes.items() if size == 0 or size < -1}
    if invalid:
        raise ValueError(
            f"Invalid mesh axis sizes {invalid}: each size must be a positive integer or -1 "
            "(the remaining devices)."
        )
    inferred = [name for name, size in sizes.items() if size == -1]
    if len(inferred) > 1:
        raise ValueError(f"Mesh axes {inferred} are all -1: at most one axis size may be -1.")
    known_product = math.prod(size for size in sizes.values() if size != -1)
    if inferred:
        if len(devices) % known_product:
            raise ValueError(
                f"Cannot infer mesh axis {inferred[0]!r}: {len(devices)} devices are not "
                f"divisible by the product {known_product} of the other axes {sizes}."
            )
        sizes[inferred[0]] = len(devices) // known_product
    elif known_product != len(devices):
        raise ValueError(
            f"Mesh shape {sizes} has {known_product} devices, but {len(devices)} are "
            "available: make the sizes multiply to the device count or set one size to -1."
        )
    return jax.make_mesh(
        tuple(sizes[name] for name in MESH_AXIS_NAMES),
        MESH_AXIS_NAMES,
        axis_types=(AxisType.Auto,) * len(MESH_AXIS_NAMES),
        devices=devices,
    )


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
    if not axes:
        return None
    if len(axes) == 1:
        return axes[0]
    return axes


def _log_fallback_once(
    name: str, dim: int, size: int, requested: tuple[str, ...], used: tuple[str, ...], mesh: Mesh
) -> None:
    key = (name, dim, size, requested)
    if key in _LOGGED_FALLBACKS:
        return
    _LOGGED_FALLBACKS.add(key)
    requested_size = math.prod(mesh.shape[axis] for axis in requested)
    logging.info(
        "Dimension %d of %s (size %d) is not divisible by mesh axes %s (size %d); "
        "sharding it over %s instead.",
        dim,
        name or "an array",
        size,
        requested,
        requested_size,
        used if used else "no axis (replicated)",
    )


def logical_to_sharding(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
    *,
    name: str = "",
) -> NamedSharding:
    """Map one array's logical axes to a `NamedSharding` on `mesh`.

    Each dimension takes the mesh axes its logical name maps to, minus axes that the mesh
    lacks or that an earlier dimension already uses. If the dimension size is not divisible
    by their total size, the longest leading subset of them that divides it is used, down to
    replication. This fallback is logged once per `name` and dimension and is never an error.

    Args:
        logical_axes: One logical name (or None for replicated) per dimension.
        shape: The array shape.
        mesh: The device mesh.
        rules: Map from logical names to mesh axes.
        name: Leaf path used in log messages and errors.

    Returns:
        The sharding.

    Raises:
        ValueError: If the number of logical axes differs from the rank, or a logical name is
            not in `rules`.
    """
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"Parameter {name or '<unnamed>'} has logical_axes {tuple(logical_axes)} for shape "
            f"{tuple(shape)}: give exactly one logical axis name (or None) per dimension."
        )
    used: set[str] = set()
    spec = []
    for dim, (logical, size) in enumerate(zip(logical_axes, shape, strict=True)):
        if logical is None:
            spec.append(None)
            continue
        if logical not in rules:
            raise ValueError(
                f"Parameter {name or '<unnamed>'} uses unknown logical axis {logical!r}: "
                f"use one of {sorted(rules)} or add it to the rules."
            )
        requested = tuple(
            axis for axis in _as_tuple(rules[logical]) if axis in mesh.shape and axis not in used
        )
        chosen = requested
        while chosen and size % math.prod(mesh.shape[axis] for axis in chosen):
            chosen = chosen[:-1]
        if chosen != requested:
            _log_fallback_once(name, dim, size, requested, chosen, mesh)
        used.update(chosen)
        spec.append(_spec_entry(chosen))
    return NamedSharding(mesh, P(*spec))


def _is_variable(node: Any) -> bool:
    return isinstance(node, nnx.Variable)


def param_shardings(
    abstract_state: PyTree, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> PyTree:
    """Compute the sharding of every parameter from its `logical_axes` metadata.

    Args:
        abstract_state: An `nnx.State` of `nnx.Param` (from `nnx.split(model, nnx.Param)`,
            usually under `nnx.eval_shape`), whose values are arrays or `ShapeDtypeStruct`.
        mesh: The device mesh.
        rules: Map from logical names to mesh axes.

    Returns:
        A tree with the structure of `abstract_state` whose values are `NamedSharding`, usable
        as `in_shardings`/`out_shardings` of `jax.jit` and with `jax.device_put`.

    Raises:
        ValueError: If a leaf is not an `nnx.Variable` or lacks `logical_axes` metadata, or
            its logical axes do not fit its shape.
    """

    def sharding_for(keypath: Any, leaf: Any) -> Any:
        name = "/".join(path_names(keypath))
        if not isinstance(leaf, nnx.Variable):
            raise ValueError(
                f"Leaf {name} is a {type(leaf).__name__}, not an nnx.Variable: pass the state "
                "from nnx.split(model, nnx.Param)."
            )
        logical_axes = leaf.get_metadata().get("logical_axes")
        if logical_axes is None:
            raise ValueError(
                f"Parameter {name} has no logical_axes metadata: create it as "
                "nnx.Param(value, logical_axes=(...)) with one name or None per dimension."
            )
        value = leaf.get_value()
        sharding = logical_to_sharding(logical_axes, value.shape, mesh, rules, name=name)
        return leaf.replace(sharding)

    return jax.tree_util.tree_map_with_path(sharding_for, abstract_state, is_leaf=_is_variable)


def _fits(sharding: NamedSharding, shape: Sequence[int]) -> bool:
    spec = sharding.spec
    if len(spec) > len(shape):
        return False
    for entry, size in zip(spec, shape, strict=False):
        axes = _as_tuple(entry)
        if size % math.prod(sharding.mesh.shape[axis] for axis in axes):
            return False
    return True


def optimizer_state_shardings(
    opt_state_shapes: PyTree, params_shardings: PyTree, mesh: Mesh
) -> PyTree:
    """Give every parameter-shaped optimizer leaf (Adam moments) its parameter's sharding.

    An optimizer leaf matches the parameter whose key path is the longest suffix of the leaf's
    key path, which is how optax nests parameter-shaped trees inside its state. Leaves that
    match no parameter, scalars (step counts, injected hyperparameters) and leaves whose shape
    does not fit the parameter's sharding are replicated.

    Args:
        opt_state_shapes: `jax.eval_shape(tx.init, params)`.
        params_shardings: The result of `param_shardings` (or any tree of `NamedSharding` with
            the key paths of the parameters).
        mesh: The device mesh.

    Returns:
        A tree with the structure of `opt_state_shapes` whose leaves are `NamedSharding`.
    """
    by_path = {
        tuple(str(key) for key in keypath): sharding
        for keypath, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    replicated = NamedSharding(mesh, P())

    def sharding_for(keypath: Any, leaf: Any) -> NamedSharding:
        if not getattr(leaf, "shape", ()):
            return replicated
        keys = tuple(str(key) for key in keypath)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None:
                return sharding if _fits(sharding, leaf.shape) else replicated
        return replicated

    return jax.tree_util.tree_map_with_path(sharding_for, opt_state_shapes)


def batch_sharding(mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Return the sharding of batch arrays: dimension 0 over the `batch` mesh axes."""
    axes = tuple(axis for axis in _as_tuple(rules["batch"]) if axis in mesh.shape)
    return NamedSharding(mesh, P(_spec_entry(axes)))


def _num_batch_shards(sharding: NamedSharding) -> int:
    return math.prod(sharding.mesh.shape[axis] for axis in _as_tuple(sharding.spec[0]))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Turn host arrays into global arrays sharded on the batch dimension.

    In a multi-process run each process passes its own rows; the global batch is their
    concatenation in process order.

    Args:
        batch: Map from names to host arrays with a shared leading batch dimension.
        mesh: The device mesh.

    Returns:
        The same names mapped to global `jax.Array`s.

    Raises:
        ValueError: If an array is a scalar, the leading dimensions differ, or the global
            batch size is not divisible by the number of batch shards.
    """
    sharding = batch_sharding(mesh)
    num_shards = _num_batch_shards(sharding)
    arrays = {key: np.asarray(value) for key, value in batch.items()}
    sizes = {key: array.shape[0] if array.ndim else None for key, array in arrays.items()}
    scalars = sorted(key for key, size in sizes.items() if size is None)
    if scalars:
        raise ValueError(
            f"Batch entries {scalars} are scalars: every entry needs a leading batch dimension."
        )
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"Batch entries have different leading dimensions {sizes}: all must be equal."
        )
    local_size = next(iter(sizes.values()), 0)
    global_size = local_size * jax.process_count()
    if global_size % num_shards:
        raise ValueError(
            f"Global batch size {global_size} is not divisible by the {num_shards} batch "
            f"shards of mesh {dict(mesh.shape)}: pad it with pad_batch(batch, {num_shards}) "
            "and mask the padded rows."
        )
    return {
        key: jax.make_array_from_process_local_data(sharding, array)
        for key, array in arrays.items()
    }


def pad_batch(batch: PyTree, multiple: int) -> tuple[PyTree, np.ndarray]:
    """Pad the batch dimension up to a multiple so no evaluation row is dropped.

    Padded rows repeat the last real row, so the model gets ordinary inputs and no NaN from
    fully masked rows. Callers must discard the padded rows with the returned mask.

    Args:
        batch: A pytree of host arrays with a shared leading batch dimension.
        multiple: The batch size must become a multiple of this (e.g. the number of batch
            shards).

    Returns:
        `(padded, valid_mask)`: the padded batch and a bool array of the padded batch size,
        true for real rows.

    Raises:
        ValueError: If `multiple` is not positive, the batch is empty, or the leading
            dimensions differ.
    """
    if multiple < 1:
        raise ValueError(f"multiple={multiple} is invalid: it must be >= 1.")
    arrays = jax.tree.map(np.asarray, batch)
    leaves = jax.tree.leaves(arrays)
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if not leaves or sizes == {0}:
        raise ValueError("The batch is empty: pad_batch needs at least one row.")
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Batch arrays have leading dimensions {sorted(sizes, key=str)}: every array needs "
            "the same leading batch dimension."
        )
    size = sizes.pop()
    padding = -size % multiple
    valid_mask = np.arange(size + padding) < size
    if not padding:
        return arrays, valid_mask

    def pad(array: np.ndarray) -> np.ndarray:
        widths = [(0, padding)] + [(0, 0)] * (array.ndim - 1)
        return np.pad(array, widths, mode="edge")

    return jax.tree.map(pad, arrays), valid_mask


# The mesh that model code constrains its large activations to while a step is traced; None
# outside `activation_mesh`, so eager calls and single-device use pay nothing.
_ACTIVATION_MESH: list[Mesh | None] = [None]


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Let `constrain` shard activations over `mesh` inside this block (used while tracing)."""
    previous = _ACTIVATION_MESH[0]
    _ACTIVATION_MESH[0] = mesh
    try:
        yield
    finally:
        _ACTIVATION_MESH[0] = previous


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Constrain an activation to the sharding its logical axes map to; a no-op without a mesh."""
    mesh = _ACTIVATION_MESH[0]
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_sharding(logical_axes, x.shape, mesh, name="activation"))
