"""Orbax checkpoints of the training state, and a SIGTERM/SIGINT guard for preemption.

Each checkpoint step contains three items: `state` (any pytree of arrays: parameters, optimizer
state, step counter, RNG key data), `data_state` (JSON: the input pipeline position) and
`metadata` (JSON: config, tokenizer name, anything needed to rebuild the model). Orbax writes
each step into a temporary directory and renames it when complete, so a crash during a save
never leaves a half-written step behind.

Restoring always takes an explicit target with shardings, so a checkpoint written on one mesh
restores on another mesh or device count. `restore_host` reads it into host numpy arrays.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import threading
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from longflax.sharding import key_name, path_names

PyTree = Any

_STATE = "state"
_DATA_STATE = "data_state"
_METADATA = "metadata"
# Paths listed in a structure-mismatch error before it is cut short.
_MAX_LISTED_PATHS = 10


def _check_json(name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} is a {type(value).__name__}: pass a dict of JSON values.")
    try:
        json.dumps(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} is not JSON-serialisable ({error}): store only dicts, lists, strings, "
            "numbers, booleans and None (convert numpy or JAX scalars with int() or float())."
        ) from error


def _full_names(keypath: Any) -> tuple[str, ...]:
    return tuple(key_name(key) for key in keypath)


def _describe(keypath: Any) -> str:
    return "/".join(path_names(keypath)) or "<root>"


def _format_paths(keypaths: list[Any]) -> str:
    text = ", ".join(_describe(keypath) for keypath in keypaths[:_MAX_LISTED_PATHS])
    if len(keypaths) > _MAX_LISTED_PATHS:
        text += f" and {len(keypaths) - _MAX_LISTED_PATHS} more"
    return text


class Checkpointer:
    """Save and restore training checkpoints with Orbax's `CheckpointManager`.

    The last `max_to_keep` steps are kept, plus every step divisible by `keep_every_n_steps`
    permanently. Saves are asynchronous: `save` returns once the arrays are copied off the
    devices, and `wait()` blocks until the write is committed.

    Args:
        directory: Folder with one subfolder per step, created if missing.
        max_to_keep: Number of most recent steps to keep, >= 1.
        keep_every_n_steps: Also keep every step divisible by this, or None.
        async_save: Write in a background thread (default) or block in `save`.

    Raises:
        ValueError: If `max_to_keep` or `keep_every_n_steps` is not a positive integer.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_to_keep: int,
        keep_every_n_steps: int | None = None,
        async_save: bool = True,
    ) -> None:
        if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep!r} is invalid: it must be an integer >= 1.")
        if keep_every_n_steps is not None and (
            isinstance(keep_every_n_steps, bool)
            or not isinstance(keep_every_n_steps, int)
            or keep_every_n_steps < 1
        ):
            raise ValueError(
                f"keep_every_n_steps={keep_every_n_steps!r} is invalid: it must be an integer "
                ">= 1, or None to keep only the latest steps."
            )
        self.directory = pathlib.Path(directory).resolve()
        policies = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        if keep_every_n_steps is not None:
            policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every_n_steps))
        options = ocp.CheckpointManagerOptions(
            create=True,
            enable_async_checkpointing=async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        )
        # Registering the handlers up front lets a new process read metadata and restore
        # without first saving through this manager.
        handlers = {
            _STATE: ocp.StandardCheckpointHandler(),
            _DATA_STATE: ocp.JsonCheckpointHandler(),
            _METADATA: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def all_steps(self) -> list[int]:
        """Return the committed steps in increasing order."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Return the latest committed step, or None if there is none."""
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        data_state: Mapping[str, Any],
        metadata: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Start saving a checkpoint for `step`.

        Args:
            step: The optimizer update count, >= 0, not saved before.
            state: A pytree of arrays (sharded `jax.Array`s are written by their owners).
            data_state: JSON dict with the input pipeline position.
            metadata: JSON dict with run information.
            force: Save even where Orbax's save policy would skip this step.

        Returns:
            Whether a save was started.

        Raises:
            ValueError: If `step` is invalid or exists, or an item is not a JSON dict.
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step={step!r} is invalid: it must be an integer >= 0.")
        step = int(step)
        _check_json("data_state", data_state)
        _check_json("metadata", metadata)
        self._manager.wait_until_finished()
        if step in self._manager.all_steps():
            raise ValueError(
                f"Checkpoint step {step} already exists in {self.directory}: save under a new "
                "step or delete the old one first."
            )
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardSave(state),
                    _DATA_STATE: ocp.args.JsonSave(dict(data_state)),
                    _METADATA: ocp.args.JsonSave(dict(metadata)),
                }
            ),
            force=force,
        )
        if saved:
            logging.info("Saving checkpoint step %d to %s.", step, self.directory)
        return saved

    def _resolve_step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise ValueError(
                    f"No checkpoint found in {self.directory}: save one first or point to the "
                    "folder that holds the step subfolders."
                )
            return steps[-1]
        if step not in steps:
            raise ValueError(
                f"Checkpoint step {step} not found in {self.directory}. Available steps: {steps}."
            )
        return step

    def _saved_arrays(self, step: int) -> dict[tuple[str, ...], tuple[Any, Any]]:
        """Return {full path: (key path, array metadata)} of the saved `state` item."""
        tree = self._manager.item_metadata(step)[_STATE]
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {_full_names(keypath): (keypath, leaf) for keypath, leaf in flat}

    def _check_target(self, step: int, target: PyTree) -> None:
        saved = self._saved_arrays(step)
        flat_target, _ = jax.tree_util.tree_flatten_with_path(target)
        requested = {_full_names(keypath): (keypath, leaf) for keypath, leaf in flat_target}

        missing = [requested[names][0] for names in sorted(set(requested) - set(saved))]
        if missing:
            raise ValueError(
                f"The restore target has leaves {_format_paths(missing)} that checkpoint step "
                f"{step} in {self.directory} lacks: build the target from the same model and "
                "optimizer as the saved run."
            )
        unused = [saved[names][0] for names in sorted(set(saved) - set(requested))]
        if unused:
            raise ValueError(
                f"Checkpoint step {step} in {self.directory} has leaves {_format_paths(unused)} "
                "that the restore target lacks: build the target from the same model and "
                "optimizer as the saved run."
            )

        for names, (keypath, leaf) in requested.items():
            saved_shape = tuple(saved[names][1].shape)
            if tuple(leaf.shape) != saved_shape:
                raise ValueError(
                    f"Leaf {_describe(keypath)} has shape {saved_shape} in checkpoint step "
                    f"{step}, but the restore target has shape {tuple(leaf.shape)}: build the "
                    "target with the saved shape (e.g. the same max_position_embeddings)."
                )
            if getattr(leaf, "sharding", None) is None:
                raise ValueError(
                    f"Restore target leaf {_describe(keypath)} has no sharding: give every "
                    "leaf jax.ShapeDtypeStruct(shape, dtype, sharding=...), or use "
                    "restore_host() for host numpy arrays."
                )

    def restore(
        self, step: int | None = None, *, target: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        """Restore a checkpoint onto the shardings given by `target`.

        Args:
            step: The step to restore; None means the latest.
            target: A pytree like the saved state whose leaves are `jax.ShapeDtypeStruct`
                (or arrays) carrying the desired `sharding`, for any mesh or device count.

        Returns:
            `(state, data_state, metadata)`, where state has the structure of `target`.

        Raises:
            ValueError: If the step does not exist, or the target's structure, a leaf shape
                or a leaf sharding does not match the checkpoint.
        """
        step = self._resolve_step(step)
        self._check_target(step, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(target),
                    _DATA_STATE: ocp.args.JsonRestore(),
                    _METADATA: ocp.args.JsonRestore(),
                }
            ),
        )
        logging.info("Restored checkpoint step %d from %s.", step, self.directory)
        return restored[_STATE], dict(restored[_DATA_STATE]), dict(restored[_METADATA])

    def restore_host(
        self, step: int | None = None
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Restore a checkpoint as host numpy arrays, e.g. for inspection or export.

        The arrays pass through the first CPU device, whatever the saved mesh was.

        Args:
            step: The step to restore; None means the latest.

        Returns:
            `(state, data_state, metadata)`, where state has `np.ndarray` leaves in the
            nested dicts and lists that Orbax stores: an `nnx.Variable` value appears under a
            "value" key, a tuple as a list and an empty optimizer state as None.

        Raises:
            ValueError: If the step does not exist.
        """
        step = self._resolve_step(step)
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        saved_tree = self._manager.item_metadata(step)[_STATE].tree
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=cpu), saved_tree
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE: ocp.args.StandardRestore(target),
                    _DATA_STATE: ocp.args.JsonRestore(),
                    _METADATA: ocp.args.JsonRestore(),
                }
            ),
        )
        state = jax.tree.map(np.asarray, jax.device_get(restored[_STATE]))
        return state, dict(restored[_DATA_STATE]), dict(restored[_METADATA])

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Read only the JSON `metadata` item of a step (the latest by default).

        Raises:
            ValueError: If the step does not exist.
        """
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_METADATA: ocp.args.JsonRestore()})
        )
        return dict(restored[_METADATA])

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release Orbax's background resources."""
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionGuard:
    """Turn SIGTERM (and optionally SIGINT) into a flag that the training loop polls.

    Inside the `with` block the first signal only sets `should_stop`, so the loop can finish
    its step, save a checkpoint and exit cleanly. A second SIGINT raises `KeyboardInterrupt`,
    so Ctrl-C pressed twice still stops a stuck run. The previous handlers are restored on exit.

    NOTE: The flag is per process. In a multi-host run every host must reach the same decision
    before saving (for example by combining the flag across hosts), which this class does not do.

    Args:
        handle_sigint: Also handle SIGINT (Ctrl-C) instead of raising KeyboardInterrupt.
    """

    def __init__(self, *, handle_sigint: bool = False) -> None:
        self._signals = [signal.SIGTERM] + ([signal.SIGINT] if handle_sigint else [])
        self._previous: dict[int, Any] = {}
        self._received: int | None = None
        self._active = False

    @property
    def should_stop(self) -> bool:
        """Whether a handled signal has arrived."""
        return self._received is not None

    @property
    def received_signal(self) -> signal.Signals | None:
        """The first handled signal that arrived, or None."""
        return None if self._received is None else signal.Signals(self._received)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._received is None:
            self._received = signum
        logging.warning(
            "Received %s: stopping after the current step.", signal.Signals(signum).name
        )

    def __enter__(self) -> PreemptionGuard:
        if self._active:
            raise RuntimeError(
                "PreemptionGuard is already active: use one `with` block per guard instance."
            )
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "PreemptionGuard must be entered in the main thread, because Python delivers "
                "signals only there: create it where the training loop starts."
            )
        self._received = None
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self._active = False
