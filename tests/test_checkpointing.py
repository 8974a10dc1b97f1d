"""Tests for longflax.checkpointing: saves on one mesh, restores on others, pruning, signals."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from longflax import checkpointing, optim, sharding

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
MAX_POSITIONS = 4098
EMBED = 8


def param(rng, shape, logical_axes, scale=0.2):
    value = rng.normal(0.0, scale, shape).astype(np.float32)
    return nnx.Param(jnp.asarray(value), logical_axes=logical_axes)


class TinyEncoder(nnx.Module):
    """Embeddings with a 4098-row position table and one MLP block."""

    def __init__(self, *, max_positions: int = MAX_POSITIONS, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.word_embeddings = nnx.Dict(
            {"embedding": param(rng, (64, EMBED), ("vocab", "embed"), 1.0)}
        )
        self.position_embeddings = nnx.Dict(
            {"embedding": param(rng, (max_positions, EMBED), ("positions", "embed"))}
        )
        self.intermediate = nnx.Dict(
            {
                "kernel": param(rng, (EMBED, 16), ("embed", "mlp")),
                "bias": param(rng, (16,), ("mlp",)),
            }
        )
        self.output = nnx.Dict(
            {
                "kernel": param(rng, (16, EMBED), ("mlp", "embed")),
                "bias": param(rng, (EMBED,), ("embed",)),
            }
        )

    def __call__(self, input_ids, positions):
        hidden = self.word_embeddings["embedding"][...][input_ids]
        hidden = hidden + self.position_embeddings["embedding"][...][positions]
        mlp = jax.nn.gelu(
            hidden @ self.intermediate["kernel"][...] + self.intermediate["bias"][...]
        )
        hidden = hidden + mlp @ self.output["kernel"][...] + self.output["bias"][...]
        return hidden @ self.word_embeddings["embedding"][...].T


class TrainSetup:
    """A sharded train state and a jitted train step on a given mesh."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.graphdef, params = nnx.split(TinyEncoder(), nnx.Param)
        schedule = optim.make_schedule(peak_learning_rate=1e-2, warmup_steps=2, total_steps=50)
        self.tx = optim.make_optimizer(params, learning_rate=schedule, weight_decay=0.01)
        self.params_shardings = sharding.param_shardings(jax.eval_shape(lambda: params), mesh)
        opt_shapes = jax.eval_shape(self.tx.init, params)
        self.opt_shardings = sharding.optimizer_state_shardings(
            opt_shapes, self.params_shardings, mesh
        )
        self.state_shardings = {
            "params": self.params_shardings,
            "opt_state": self.opt_shardings,
            "step": NamedSharding(mesh, P()),
            "rng": NamedSharding(mesh, P()),
        }
        params = jax.device_put(params, self.params_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        initial = {
            "params": params,
            "opt_state": opt_state,
            "step": np.int32(0),
            "rng": np.asarray(jax.random.key_data(jax.random.key(42))),
        }
        self.state = jax.device_put(initial, self.state_shardings)
        self.step_fn = jax.jit(self._train_step, out_shardings=(self.state_shardings, None))

    def _loss(self, params, batch, rng):
        del rng
        logits = nnx.merge(self.graphdef, params)(batch["input_ids"], batch["positions"])
        log_probs = jax.nn.log_softmax(logits)
        token_losses = -jnp.take_along_axis(log_probs, batch["labels"][..., None], -1)[..., 0]
        return token_losses.sum(), {"num_tokens": jnp.float32(token_losses.size)}

    def _train_step(self, state, batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        grads, metrics = optim.accumulate_gradients(
            self._loss, state["params"], batch, num_microbatches=2, rng=step_rng
        )
        params, opt_state, _ = optim.apply_updates(
            self.tx, state["opt_state"], state["params"], grads
        )
        new_state = {
            "params": params,
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": jax.random.key_data(rng),
        }
        return new_state, metrics["loss"]

    def batch(self, seed: int):
        rng = np.random.default_rng(seed)
        host = {
            "input_ids": rng.integers(0, 64, (8, 6)).astype(np.int32),
            "positions": rng.integers(0, MAX_POSITIONS, (8, 6)).astype(np.int32),
            "labels": rng.integers(0, 64, (8, 6)).astype(np.int32),
        }
        return sharding.shard_batch(host, self.mesh)

    def target(self, mesh, state=None):
        """Abstract state with shardings for `mesh` (a Mesh or a single-device sharding)."""
        state = self.state if state is None else state
        if isinstance(mesh, jax.sharding.Sharding):
            return jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh), state
            )
        abstract_params = jax.eval_shape(lambda: state["params"])
        params_shardings = sharding.param_shardings(abstract_params, mesh)
        opt_shardings = sharding.optimizer_state_shardings(
            jax.eval_shape(lambda: state["opt_state"]), params_shardings, mesh
        )
        shardings = {
            "params": params_shardings,
            "opt_state": opt_shardings,
            "step": NamedSharding(mesh, P()),
            "rng": NamedSharding(mesh, P()),
        }
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )


def flat_arrays(tree) -> dict[tuple[str, ...], np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        tuple(sharding.key_name(key) for key in keypath): np.asarray(leaf) for keypath, leaf in flat
    }


def assert_trees_bitwise_equal(actual, expected):
    actual_flat = flat_arrays(actual)
    expected_flat = flat_arrays(expected)
    assert actual_flat.keys() == expected_flat.keys()
    for name, value in expected_flat.items():
        assert actual_flat[name].dtype == value.dtype, name
        np.testing.assert_array_equal(actual_flat[name], value, err_msg="/".join(name))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A (2, 4) data x tensor run after two updates, saved at step 2, plus its next step."""
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    setup = TrainSetup(mesh)
    state = setup.state
    for seed in range(2):
        state, _ = setup.step_fn(state, setup.batch(seed))
    directory = tmp_path_factory.mktemp("checkpoints")
    metadata = {"model": {"max_position_embeddings": MAX_POSITIONS}, "tokenizer": "tiny"}
    with checkpointing.Checkpointer(directory, max_to_keep=3) as checkpointer:
        assert checkpointer.save(2, state, data_state={"epoch": 0, "offset": 16}, metadata=metadata)
    next_state, next_loss = setup.step_fn(state, setup.batch(2))
    return {
        "setup": setup,
        "state": state,
        "directory": directory,
        "metadata": metadata,
        "next_state": next_state,
        "next_loss": next_loss,
    }


# --- Restoring on other meshes and device counts --------------------------------------------


def test_saved_state_is_sharded(trained):
    position_table = trained["state"]["params"]["position_embeddings"]["embedding"][...]
    assert position_table.shape == (MAX_POSITIONS, EMBED)
    assert position_table.sharding.spec == P(None, "fsdp")
    kernel = trained["state"]["params"]["intermediate"]["kernel"][...]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert len(kernel.sharding.device_set) == 8


def test_restore_on_data_mesh(trained):
    mesh = sharding.make_mesh({"data": 8})
    target = trained["setup"].target(mesh, trained["state"])
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        state, data_state, metadata = checkpointer.restore(target=target)
    assert_trees_bitwise_equal(state, trained["state"])
    assert data_state == {"epoch": 0, "offset": 16}
    assert metadata == trained["metadata"]
    kernel = state["params"]["intermediate"]["kernel"][...]
    assert kernel.sharding.mesh.shape == mesh.shape
    assert isinstance(state["params"], nnx.State)


def test_restore_on_one_device(trained):
    single = SingleDeviceSharding(jax.devices()[0])
    target = trained["setup"].target(single, trained["state"])
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        state, _, _ = checkpointer.restore(2, target=target)
    assert_trees_bitwise_equal(state, trained["state"])
    table = state["params"]["position_embeddings"]["embedding"][...]
    assert table.sharding == single


def test_restore_host_numpy(trained):
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        state, data_state, metadata = checkpointer.restore_host()
    assert data_state == {"epoch": 0, "offset": 16}
    assert metadata == trained["metadata"]
    table = state["params"]["position_embeddings"]["embedding"]["value"]
    assert isinstance(table, np.ndarray)
    assert table.shape == (MAX_POSITIONS, EMBED)
    expected = flat_arrays(trained["state"])
    restored = flat_arrays(state)
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        assert isinstance(restored[name], np.ndarray), name
        np.testing.assert_array_equal(restored[name], value, err_msg="/".join(name))


@pytest.mark.slow
def test_single_device_process_reads_checkpoint(trained):
    script = textwrap.dedent(
        f"""
        import json, sys
        import jax
        from longflax import checkpointing
        checkpointer = checkpointing.Checkpointer({str(trained["directory"])!r}, max_to_keep=3)
        metadata = checkpointer.read_metadata()
        state, _, _ = checkpointer.restore_host(2)
        table = state["params"]["position_embeddings"]["embedding"]["value"]
        checkpointer.close()
        print(json.dumps({{"devices": jax.device_count(), "metadata": metadata,
                          "table_sum": float(table.astype("float64").sum())}}))
        """
    )
    environment = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), environment.get("PYTHONPATH", "")]
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["devices"] == 1
    assert report["metadata"] == trained["metadata"]
    table = trained["state"]["params"]["position_embeddings"]["embedding"][...]
    assert report["table_sum"] == float(np.asarray(table).astype(np.float64).sum())


def test_read_metadata_only(trained):
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        assert checkpointer.read_metadata() == trained["metadata"]
        assert checkpointer.read_metadata(2) == trained["metadata"]
        assert checkpointer.latest_step() == 2


def test_resume_matches_uninterrupted_run(trained):
    setup = trained["setup"]
    target = setup.target(setup.mesh, trained["state"])
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        state, _, _ = checkpointer.restore(target=target)
    next_state, next_loss = setup.step_fn(state, setup.batch(2))
    assert np.asarray(next_loss) == np.asarray(trained["next_loss"])
    assert_trees_bitwise_equal(next_state, trained["next_state"])
    assert int(next_state["step"]) == 3


def test_restore_into_smaller_table_names_leaf(trained):
    setup = trained["setup"]
    short_params = nnx.state(TinyEncoder(max_positions=514), nnx.Param)
    short_state = dict(trained["state"], params=short_params)
    target = setup.target(SingleDeviceSharding(jax.devices()[0]), short_state)
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        with pytest.raises(
            ValueError,
            match=r"Leaf params/position_embeddings/embedding has shape \(4098, 8\) in checkpoint "
            r"step 2, but the restore target has shape \(514, 8\)",
        ):
            checkpointer.restore(target=target)


def test_restore_structure_errors(trained):
    single = SingleDeviceSharding(jax.devices()[0])
    target = trained["setup"].target(single, trained["state"])
    with checkpointing.Checkpointer(trained["directory"], max_to_keep=3) as checkpointer:
        extra = dict(target, epoch=jax.ShapeDtypeStruct((), jnp.int32, sharding=single))
        with pytest.raises(
            ValueError,
            match=r"The restore target has leaves epoch that checkpoint step 2 in .* lacks",
        ):
            checkpointer.restore(target=extra)
        missing = {key: value for key, value in target.items() if key != "rng"}
        with pytest.raises(ValueError, match=r"has leaves rng that the restore target lacks"):
            checkpointer.restore(target=missing)
        unsharded = dict(target, step=jax.ShapeDtypeStruct((), jnp.int32))
        with pytest.raises(ValueError, match=r"Restore target leaf step has no sharding"):
            checkpointer.restore(target=unsharded)
        with pytest.raises(
            ValueError, match=r"Checkpoint step 7 not found in .*\. Available steps: \[2\]"
        ):
            checkpointer.restore(7, target=target)


# --- Saving and pruning ---------------------------------------------------------------------


def small_state(step: int):
    return {"weights": np.full((4,), step, np.float32)}


def test_keeps_last_n_and_every_k(tmp_path):
    with checkpointing.Checkpointer(
        tmp_path, max_to_keep=2, keep_every_n_steps=5, async_save=False
    ) as checkpointer:
        for step in range(1, 13):
            checkpointer.save(step, small_state(step), data_state={}, metadata={"step": step})
        checkpointer.wait()
        assert checkpointer.all_steps() == [5, 10, 11, 12]
        assert checkpointer.latest_step() == 12
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [
        "10",
        "11",
        "12",
        "5",
    ]


def test_keeps_last_n_only(tmp_path):
    with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as checkpointer:
        for step in range(6):
            checkpointer.save(step, small_state(step), data_state={}, metadata={})
        checkpointer.wait()
        assert checkpointer.all_steps() == [3, 4, 5]
        state, _, metadata = checkpointer.restore_host(4)
    np.testing.assert_array_equal(state["weights"], np.full((4,), 4, np.float32))
    assert metadata == {}


def test_checkpointer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"max_to_keep=0 is invalid: it must be an integer >= 1"):
        checkpointing.Checkpointer(tmp_path, max_to_keep=0)
    with pytest.raises(
        ValueError, match=r"keep_every_n_steps=0 is invalid: it must be an integer >= 1, or None"
    ):
        checkpointing.Checkpointer(tmp_path, max_to_keep=1, keep_every_n_steps=0)

    with checkpointing.Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        with pytest.raises(ValueError, match=r"No checkpoint found in .*: save one first"):
            checkpointer.restore_host()
        with pytest.raises(ValueError, match=r"No checkpoint found in"):
            checkpointer.read_metadata()
        with pytest.raises(ValueError, match=r"step=-1 is invalid: it must be an integer >= 0"):
            checkpointer.save(-1, small_state(0), data_state={}, metadata={})
        with pytest.raises(
            ValueError, match=r"metadata is not JSON-serialisable .*convert numpy or JAX scalars"
        ):
            checkpointer.save(1, small_state(1), data_state={}, metadata={"loss": np.float32(1)})
        with pytest.raises(ValueError, match=r"data_state is a list: pass a dict of JSON values"):
            checkpointer.save(1, small_state(1), data_state=[1], metadata={})
        checkpointer.save(1, small_state(1), data_state={}, metadata={})
        with pytest.raises(ValueError, match=r"Checkpoint step 1 already exists in .*new step"):
            checkpointer.save(1, small_state(1), data_state={}, metadata={})


# --- Preemption -----------------------------------------------------------------------------


def test_preemption_guard_sigterm_sets_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with checkpointing.PreemptionGuard() as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop
        assert guard.received_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_guard_sigint_twice_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with checkpointing.PreemptionGuard(handle_sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.should_stop
        assert guard.received_signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_preemption_guard_leaves_sigint_alone_by_default():
    previous = signal.getsignal(signal.SIGINT)
    with checkpointing.PreemptionGuard():
        assert signal.getsignal(signal.SIGINT) is previous


def test_preemption_guard_errors():
    guard = checkpointing.PreemptionGuard()
    with guard:
        with pytest.raises(RuntimeError, match=r"PreemptionGuard is already active"):
            guard.__enter__()

    errors = []

    def enter_in_thread():
        try:
            with checkpointing.PreemptionGuard():
                pass
        except RuntimeError as error:
            errors.append(str(error))

    thread = threading.Thread(target=enter_in_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert "must be entered in the main thread" in errors[0]
