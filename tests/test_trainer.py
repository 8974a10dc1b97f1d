"""The shared training loop: resume after interruption, accumulation, meshes, the NaN guard."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longflax import sharding
from longflax.modeling import ModelConfig, build_model
from longflax.stages import mlm_loss_fn
from longflax.trainer import Trainer, TrainSettings

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    mlp_dim=48,
    max_position_embeddings=66,
    attention="longformer",
    attention_window=8,
    max_global_tokens=4,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
)


class CountingBatches:
    """Deterministic MLM batches keyed by position; optionally sends SIGTERM at one position."""

    def __init__(self, batch_size: int = 4, length: int = 16, *, sigterm_at: int | None = None):
        self.batch_size, self.length = batch_size, length
        self.position = 0
        self.sigterm_at = sigterm_at

    def __next__(self):
        rng = np.random.default_rng([7, self.position])
        if self.sigterm_at is not None and self.position == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.position += 1
        ids = rng.integers(3, CONFIG.vocab_size, size=(self.batch_size, self.length)).astype(
            np.int32
        )
        ids[:, 0] = 0
        positions = np.sort(
            rng.choice(np.arange(1, self.length), size=(self.batch_size, 3)), axis=1
        ).astype(np.int32)
        labels = np.take_along_axis(ids, positions, axis=1)
        masked = ids.copy()
        np.put_along_axis(masked, positions, 5, axis=1)
        weights = np.ones(positions.shape, np.float32)
        weights[0, 2] = 0.0  # Unequal token counts per row.
        return {
            "input_ids": masked,
            "attention_mask": np.ones_like(ids),
            "masked_positions": positions,
            "masked_labels": labels,
            "masked_weights": weights,
        }

    def state(self):
        return {"position": self.position}

    def restore(self, state):
        self.position = state["position"]


def _settings(**overrides) -> TrainSettings:
    values = dict(
        total_steps=4,
        learning_rate=1e-3,
        warmup_steps=1,
        weight_decay=0.01,
        log_every=1,
        checkpoint_every=2,
        keep_checkpoints=3,
        freeze_global_projections=True,
        seed=0,
    )
    values.update(overrides)
    return TrainSettings(**values)


def _params(model) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {"/".join(map(str, path)): np.asarray(var[...]) for path, var in state.flat_state()}


def _trainer(tmp_path, mesh_shape=None, **settings) -> Trainer:
    mesh = sharding.make_mesh(
        mesh_shape or {"data": 1}, devices=None if mesh_shape else jax.devices()[:1]
    )
    return Trainer(
        build_model(CONFIG, "mlm", seed=3),
        mlm_loss_fn,
        _settings(**settings),
        mesh=mesh,
        stage_dir=tmp_path,
    )


def test_interrupted_run_equals_uninterrupted(tmp_path):
    reference = _params(_trainer(tmp_path / "straight").run(CountingBatches()))

    with pytest.raises(SystemExit, match="Run the same command again to resume"):
        _trainer(tmp_path / "resumed").run(CountingBatches(sigterm_at=2))
    resumed = _params(_trainer(tmp_path / "resumed").run(CountingBatches()))

    for name, value in reference.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)


def test_sigterm_while_prefetching_first_batch_saves(tmp_path):
    # The prefetch thread reads the first batch before the first step is compiled, so the
    # signal arrives while the process is still starting up.
    with pytest.raises(SystemExit, match="saved step 1"):
        _trainer(tmp_path).run(CountingBatches(sigterm_at=0))
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_resume_on_other_device_count(tmp_path):
    mesh_shape = {"data": 2, "tensor": 4}
    reference = _params(
        _trainer(tmp_path / "straight", mesh_shape).run(CountingBatches(batch_size=8))
    )

    with pytest.raises(SystemExit):
        _trainer(tmp_path / "moved", mesh_shape).run(CountingBatches(batch_size=8, sigterm_at=2))
    resumed = _params(_trainer(tmp_path / "moved").run(CountingBatches(batch_size=8)))

    for name, value in reference.items():
        np.testing.assert_allclose(resumed[name], value, atol=1e-5, err_msg=name)


def test_accumulated_batch_equals_big_batch(tmp_path):
    whole = _params(
        _trainer(tmp_path / "whole", total_steps=1, warmup_steps=0).run(
            CountingBatches(batch_size=4)
        )
    )
    parts = _params(
        _trainer(tmp_path / "parts", total_steps=1, warmup_steps=0, num_microbatches=4).run(
            CountingBatches(batch_size=4)
        )
    )
    for name, value in whole.items():
        np.testing.assert_allclose(parts[name], value, atol=1e-6, err_msg=name)


def test_global_projections_frozen_without_global_tokens(tmp_path):
    before = _params(build_model(CONFIG, "mlm", seed=3))
    after = _params(_trainer(tmp_path, total_steps=3).run(CountingBatches()))
    for name in before:
        if "_global/" in name:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert not np.array_equal(
        after["encoder/layers/0/attention/query/kernel"],
        before["encoder/layers/0/attention/query/kernel"],
    )


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path):
    def exploding_loss(model, batch, rng):
        total, aux = mlm_loss_fn(model, batch, rng)
        # The third batch's positions start at 0 only when the hook below rewrites them.
        return jnp.where(batch["masked_positions"][0, 0] == 0, jnp.nan, total), aux

    class PoisonedBatches(CountingBatches):
        def __next__(self):
            batch = super().__next__()
            if self.position == 3:
                batch["masked_positions"][0, 0] = 0
            return batch

    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = Trainer(
        build_model(CONFIG, "mlm", seed=3),
        exploding_loss,
        _settings(checkpoint_every=1),
        mesh=mesh,
        stage_dir=tmp_path,
    )
    with pytest.raises(
        RuntimeError, match=r"loss is nan at step 3; stopping\. The last good checkpoint is step 2"
    ):
        trainer.run(PoisonedBatches())
