"""The one training loop shared by every training stage (masked-LM and QA).

A task supplies a loss function and a resumable batch iterator; the loop owns the jitted step
with explicit shardings and donated state, gradient accumulation, checkpoints, preemption,
the non-finite-loss guard, logging and periodic evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from longflax import checkpointing, optim, sharding
from longflax.metrics_writer import MetricWriter

GLOBAL_PROJECTIONS = ("query_global", "key_global", "value_global")


class ResumableBatches(Protocol):
    """Host-side batch source whose position can be saved and restored."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


# loss_fn(model, batch, dropout_rng) -> (sum_loss, {"num_tokens": ..., other summed values})
LossFn = Callable[[nnx.Module, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class Prefetcher:
    """Prepares the next batches on a background thread and copies them to the devices.

    Host work (masking, gathering rows) and the host-to-device copy overlap with the running
    step. `state()` is the position of the next batch the caller has not yet received, so a
    checkpoint never skips or repeats the batches held in the queue.
    """

    def __init__(self, batches: ResumableBatches, place: Callable[[Mapping[str, np.ndarray]], Any], depth: int = 2):
        self._batches = batches
        self._place = place
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                state = self._batches.state()
                host = next(self._batches)
                item = (state, host, self._place(host))
            except BaseException as error:  # noqa: BLE001 - re-raised in the consumer thread
                item = (None, None, error)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[0] is None:
                return

    def __next__(self) -> tuple[Mapping[str, np.ndarray], Any]:
        state, host, placed = self._queue.get()
        if state is None:
            raise placed
        return host, placed

    def state(self) -> dict[str, Any]:
        """Position of the next batch not yet handed out by `__next__`."""
        with self._queue.mutex:
            pending = list(self._queue.queue)
        for item_state, _, _ in pending:
            if item_state is not None:
                return item_state
        # Nothing queued yet: wait for the producer's next batch and put it back at the head.
        item = self._queue.get()
        with self._queue.mutex:
            self._queue.queue.appendleft(item)
            self._queue.not_empty.notify()
        if item[0] is None:
            raise item[2]
        return item[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclasses.dataclass
class TrainSettings:
    """Optimisation and bookkeeping settings of one training stage."""

    total_steps: int
    learning_rate: float
    warmup_steps: int
    decay: str = "linear"
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    num_microbatches: int = 1
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    keep_every_n_steps: int | None = None
    freeze_global_projections: bool = False
    seed: int = 0


def is_global_projection(path: tuple[str, ...]) -> bool:
    return any(part in GLOBAL_PROJECTIONS for part in path)


def count_parameters(params: nnx.State) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def log_parameter_overview(params: nnx.State) -> None:
    """Log every parameter's path, shape, dtype and size, and the total (clu's table)."""
    from clu import parameter_overview

    flat = {"/".join(str(p) for p in path): var.get_value() for path, var in params.flat_state()}
    table = parameter_overview.get_parameter_overview(flat, include_stats=False)
    logging.info("Parameters (%s in total):\n%s", f"{count_parameters(params):,}", table)


class Trainer:
    """Builds the sharded train step for a model and runs the loop for one stage."""

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        settings: TrainSettings,
        *,
        mesh: jax.sharding.Mesh,
        stage_dir: pathlib.Path,
    ):
        self.settings = settings
        self.mesh = mesh
        self.stage_dir = stage_dir
        self.graphdef, params = nnx.split(model, nnx.Param)
        frozen = is_global_projection if settings.freeze_global_projections else None
        schedule = optim.make_schedule(
            peak_learning_rate=settings.learning_rate,
            warmup_steps=settings.warmup_steps,
            total_steps=settings.total_steps,
            decay=settings.decay,
        )
        self.tx = optim.make_optimizer(
            params,
            learning_rate=schedule,
            b1=settings.b1,
            b2=settings.b2,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
            max_grad_norm=settings.max_grad_norm,
            frozen=frozen,
        )

        abstract_params = jax.eval_shape(lambda: params)
        self.param_shardings = sharding.param_shardings(abstract_params, mesh)
        opt_shapes = jax.eval_shape(self.tx.init, params)
        self.opt_shardings = sharding.optimizer_state_shardings(opt_shapes, self.param_shardings, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state_shardings = {
            "params": self.param_shardings,
            "opt_state": self.opt_shardings,
            "step": replicated,
            "rng": replicated,
        }
        self.batch_sharding = sharding.batch_sharding(mesh)

        params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        self.state = {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
            "rng": jax.device_put(jax.random.key_data(jax.random.key(settings.seed)), replicated),
        }
        self._loss_fn = loss_fn
        self._step_fn = None

    # -- the jitted step -----------------------------------------------------------------------

    def _build_step(self, batch_example: Mapping[str, np.ndarray]):
        graphdef, tx, loss_fn = self.graphdef, self.tx, self._loss_fn
        num_microbatches = self.settings.num_microbatches

        def model_loss(params, batch, rng):
            model = nnx.merge(graphdef, params)
            return loss_fn(model, batch, rng)

        def step(state, batch):
            rng = jax.random.wrap_key_data(state["rng"])
            step_rng = jax.random.fold_in(rng, state["step"])
            grads, totals = optim.accumulate_gradients(
                model_loss, state["params"], batch, num_microbatches=num_microbatches, rng=step_rng
            )
            params, opt_state, stats = optim.apply_updates(tx, state["opt_state"], state["params"], grads)
            metrics = {**totals, **stats}
            new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": state["rng"]}
            return new_state, metrics

        batch_shardings = {k: self.batch_sharding for k in batch_example}
        mesh = self.mesh

        def step_with_mesh(state, batch):
            with sharding.activation_mesh(mesh):
                return step(state, batch)

        return jax.jit(
            step_with_mesh,
            in_shardings=(self.state_shardings, batch_shardings),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def abstract_state(self) -> Any:
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), self.state, self.state_shardings
        )

    def restore(self, manager: checkpointing.Checkpointer) -> dict[str, Any] | None:
        """Restore this stage's latest checkpoint; return its data state, or None if there is none."""
        if manager.latest_step() is None:
            return None
        state, data_state, metadata = manager.restore(target=self.abstract_state())
        self.state = state
        logging.info("Resumed from step %d of %s.", metadata.get("step", -1), manager.directory)
        return data_state

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        batches: ResumableBatches,
        *,
        evaluate: Callable[[nnx.Module, int], Mapping[str, float]] | None = None,
        tokens_per_batch: Callable[[Mapping[str, np.ndarray]], int] = lambda b: int(np.sum(b["attention_mask"])),
    ) -> nnx.Module:
        """Train to `total_steps`, resuming from this stage's checkpoints; return the trained model."""
        settings = self.settings
        writer = MetricWriter(self.stage_dir)
        manager = checkpointing.Checkpointer(
            self.stage_dir / "checkpoints",
            max_to_keep=settings.keep_checkpoints,
            keep_every_n_steps=settings.keep_every_n_steps,
        )
        # Installed before the restore and the prefetch thread, so a SIGTERM during start-up or
        # the first compile is handled after the next step instead of killing the process.
        with checkpointing.PreemptionGuard() as guard:
            data_state = self.restore(manager)
            if data_state:
                batches.restore(data_state["batches"])
            step = int(self.state["step"])
            if step == 0:
                log_parameter_overview(self.state["params"])

            prefetch = Prefetcher(batches, lambda b: jax.device_put(dict(b), self.batch_sharding))
            try:
                self._loop(prefetch, manager, writer, evaluate, tokens_per_batch, step, guard)
            finally:
                prefetch.close()
        manager.wait()
        manager.close()
        writer.close()
        return self.model()

    def _loop(self, prefetch, manager, writer, evaluate, tokens_per_batch, step: int, guard) -> None:
        """Run steps until `total_steps`, logging, evaluating and saving on the way."""
        settings = self.settings
        timer_start, timer_steps, timer_tokens = time.perf_counter(), 0, 0
        last_good = step
        while step < settings.total_steps:
            host_batch, batch = next(prefetch)
            if self._step_fn is None:
                self._step_fn = self._build_step(host_batch)
                compile_start = time.perf_counter()
                self.state, metrics = self._step_fn(self.state, batch)
                jax.block_until_ready(metrics["loss"])
                logging.info("First step (compile and run) took %.1f s.", time.perf_counter() - compile_start)
                writer.write(step + 1, {"perf/first_step_seconds": time.perf_counter() - compile_start}, log=False)
                timer_start = time.perf_counter()
            else:
                self.state, metrics = self._step_fn(self.state, batch)
                timer_steps += 1
                timer_tokens += tokens_per_batch(host_batch)
            step += 1

            if step % settings.log_every == 0 or step == settings.total_steps or step <= 3:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(values["loss"]):
                    manager.close()
                    writer.close()
                    raise RuntimeError(
                        f"The training loss is {values['loss']} at step {step}; stopping. The last "
                        f"good checkpoint is step {manager.latest_step()} in {manager.directory} "
                        f"(last finite loss seen at step {last_good}). Lower the learning rate or "
                        "check the data."
                    )
                last_good = step
                elapsed = time.perf_counter() - timer_start
                record = {f"train/{k}": v for k, v in values.items()}
                if timer_steps and elapsed > 0:
                    rate = timer_steps / elapsed
                    record["perf/steps_per_second"] = rate
                    record["perf/tokens_per_second"] = timer_tokens / elapsed
                    record["perf/eta_seconds"] = (settings.total_steps - step) / rate
                writer.write(step, record)

            if settings.eval_every and evaluate is not None and step % settings.eval_every == 0 and step < settings.total_steps:
                writer.write(step, {f"eval/{k}": v for k, v in evaluate(self.model(), step).items()})

            must_save = step % settings.checkpoint_every == 0 or step == settings.total_steps
            if must_save or guard.should_stop:
                manager.save(
                    step,
                    self.state,
                    data_state={"batches": prefetch.state()},
                    metadata={"step": step},
                    force=guard.should_stop,
                )
            if guard.should_stop:
                manager.wait()
                manager.close()
                writer.close()
                raise SystemExit(
                    f"Received {guard.received_signal}; saved step {step} to {manager.directory}. "
                    "Run the same command again to resume."
                )

    def model(self) -> nnx.Module:
        """Return the model with the current parameters, gathered to the host."""
        cpu = jax.devices("cpu")[0]
        params = jax.tree.map(lambda x: jax.device_put(x, cpu), self.state["params"])
        return nnx.merge(self.graphdef, params)
