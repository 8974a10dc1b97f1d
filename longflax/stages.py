"""The stages of a run: convert, mlm, qa, evaluate, export.

Each stage writes under `workdir/<stage>/`: its checkpoints, `metrics.jsonl`, TensorBoard
events, the resolved config (`config.json`) and, when it finishes, a model directory
`model/` (or `hf/` for export) plus `done.json`. A finished stage is skipped when the run is
started again; an unfinished training stage resumes from its own latest checkpoint.

Where a stage's starting weights come from, in this order:
  1. the stage's own latest checkpoint in `workdir/<stage>/checkpoints` (resume);
  2. `<stage>.resume_from`: an explicit checkpoint directory of an earlier run of this stage;
  3. `<stage>.init_from`: a model (longflax or Hugging Face directory, or hub id), or else
     the model written by the previous stage of this run;
  4. random initialisation from `model.*` settings (`<stage>.init_from = "scratch"`).
Giving both `resume_from` and `init_from` is rejected as ambiguous.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from longflax import model_io
from longflax.configuration import resolve_path
from longflax.modeling.config import ModelConfig
from longflax.modeling.encoder import PAD_MULTIPLE, build_model, validate_inputs
from longflax.trainer import Trainer, TrainSettings

PREVIOUS_MODEL = {"mlm": ("convert",), "qa": ("mlm", "convert"), "evaluate": ("qa",), "export": ("qa", "mlm", "convert")}


class RunContext:
    """Shared inputs of every stage: the config, the run directory and the device mesh."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh: jax.sharding.Mesh):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh

    def stage_dir(self, stage: str) -> pathlib.Path:
        path = self.workdir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def is_done(self, stage: str) -> bool:
        return (self.workdir / stage / "done.json").exists()

    def mark_done(self, stage: str, summary: Mapping[str, Any]) -> None:
        record = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), **summary}
        (self.stage_dir(stage) / "done.json").write_text(json.dumps(record, indent=2, default=float))

    def write_config(self, stage: str) -> None:
        (self.stage_dir(stage) / "config.json").write_text(self.config.to_json_best_effort(indent=2))


# ----------------------------------------------------------------------------------------------
# Starting weights


def _model_dir_of_stage(context: RunContext, stage: str) -> pathlib.Path | None:
    path = context.workdir / stage / "model"
    return path if (path / model_io.MODEL_FILE).exists() else None


def initial_model(context: RunContext, stage: str, head: str) -> tuple[nnx.Module, Any, str]:
    """Load the weights a stage starts from (steps 3 and 4 of the module's resume order).

    Returns:
      (model, tokenizer, description of the source).
    """
    stage_config = context.config[stage]
    init_from = stage_config.get("init_from", "")
    if stage_config.get("resume_from", "") and init_from:
        raise ValueError(
            f"{stage}.resume_from and {stage}.init_from are both set; give only one: resume_from "
            "continues an earlier run of this stage, init_from starts a new one from a model."
        )
    if init_from == "scratch":
        return (*scratch_model(context, head), "scratch")
    if init_from:
        try:
            model, tokenizer = model_io.load(init_from, head=head)
        except ValueError as error:
            raise ValueError(
                f"{stage}.init_from={init_from!r} could not be loaded: {error} If it names the output of "
                "another run (for example runs/<model>-mlm/mlm/model from configs/xlmr_long_mlm.py), run "
                f"that config first, or pass --config.{stage}.init_from=DIR."
            ) from error
        return model, tokenizer or _tokenizer(context, None), init_from
    for previous in PREVIOUS_MODEL.get(stage, ()):
        directory = _model_dir_of_stage(context, previous)
        if directory is not None:
            model, tokenizer = model_io.load(directory, head=head)
            return model, tokenizer or _tokenizer(context, None), str(directory)
    raise ValueError(
        f"Stage {stage!r} has no starting model: run an earlier stage ({', '.join(PREVIOUS_MODEL.get(stage, ()))}) "
        f"in this workdir, or set {stage}.init_from to a model directory, a hub id or 'scratch'."
    )


def _tokenizer(context: RunContext, fallback):
    name = context.config.get("tokenizer", "")
    if not name:
        return fallback
    return load_tokenizer(name)


def load_tokenizer(name: str):
    """Load a fast tokenizer from a directory, a `data:` path or a hub id.

    A directory with only `vocab.json` and `merges.txt` is read as a RoBERTa byte-level BPE
    tokenizer.
    """
    from transformers import AutoTokenizer, RobertaTokenizerFast

    from longflax.configuration import resolve_path

    if name.startswith("data:"):
        from longflax.data.squad import resolve_data_file

        name = str(resolve_data_file(name[len("data:") :] + "/vocab.json").parent)
    path = pathlib.Path(name).expanduser()
    if name.startswith(("/", "./", "../", "~")) and not path.is_dir():
        raise ValueError(f"Tokenizer directory {name} not found; give a tokenizer directory, a data: path or a hub id.")
    if path.is_dir() and (path / "vocab.json").exists() and not (path / "tokenizer_config.json").exists():
        return RobertaTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(resolve_path(name))


def scratch_model(context: RunContext, head: str) -> tuple[nnx.Module, Any]:
    """Build a randomly initialised model with the `scratch` architecture and the run's tokenizer."""
    tokenizer = _tokenizer(context, None)
    if tokenizer is None:
        raise ValueError('A model built from scratch needs config.tokenizer (for example "data:tokenizers/roberta-base").')
    settings = dict(context.config.scratch.to_dict())
    config = ModelConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        sep_token_id=tokenizer.sep_token_id,
        **settings,
    )
    return build_model(config, head, seed=context.config.seed), tokenizer


def _resume_source(context: RunContext, stage: str, trainer: Trainer) -> None:
    """Copy an explicit `resume_from` checkpoint into the trainer (step 2 of the resume order)."""
    from longflax import checkpointing

    resume_from = context.config[stage].get("resume_from", "")
    own = context.workdir / stage / "checkpoints"
    if not resume_from or (own.exists() and any(own.iterdir())):
        return
    manager = checkpointing.Checkpointer(resume_from, max_to_keep=1000)
    if manager.latest_step() is None:
        raise ValueError(f"{stage}.resume_from={resume_from}: no checkpoint found there; point it at a checkpoints directory.")
    trainer.state, _, metadata = manager.restore(target=trainer.abstract_state())
    manager.close()
    logging.info("Continuing from %s at step %s.", resume_from, metadata.get("step"))


def check_batch_fits_mesh(context: RunContext, stage: str) -> None:
    """Each micro-batch is split over the data-parallel devices, so it must divide evenly."""
    from longflax import sharding

    c = context.config[stage]
    spec = sharding.batch_sharding(context.mesh).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    shards = math.prod(context.mesh.shape[axis] for axis in axes)
    rows = c.batch_size // c.num_microbatches
    if rows % shards:
        raise ValueError(
            f"{stage}.batch_size={c.batch_size} with {stage}.num_microbatches={c.num_microbatches} gives "
            f"micro-batches of {rows} rows, which cannot be split over the {shards} data-parallel devices "
            f"of the mesh {dict(context.mesh.shape)}; make batch_size / num_microbatches a multiple of {shards}."
        )


def _settings(context: RunContext, stage: str, total_steps: int) -> TrainSettings:
    c = context.config[stage]
    check_batch_fits_mesh(context, stage)
    warmup = c.warmup_steps if c.warmup_steps >= 0 else int(round(c.warmup_ratio * total_steps))
    return TrainSettings(
        total_steps=total_steps,
        learning_rate=c.learning_rate,
        warmup_steps=min(warmup, total_steps),
        decay=c.decay,
        weight_decay=c.weight_decay,
        b1=c.b1,
        b2=c.b2,
        eps=c.eps,
        max_grad_norm=c.max_grad_norm,
        num_microbatches=c.num_microbatches,
        log_every=context.config.log_every,
        eval_every=c.get("eval_every", 0),
        checkpoint_every=context.config.checkpoint.every,
        keep_checkpoints=context.config.checkpoint.keep,
        keep_every_n_steps=context.config.checkpoint.keep_every or None,
        freeze_global_projections=c.get("freeze_global_projections", False),
        seed=context.config.seed,
    )


def _apply_model_overrides(model: nnx.Module, context: RunContext) -> nnx.Module:
    """Apply run-time model settings (dtype, remat, scan, dropout) that do not change weights."""
    overrides = {
        key: context.config.model[key]
        for key in ("dtype", "remat", "scan_layers", "dropout_rate", "attention_dropout_rate")
        if key in context.config.model and context.config.model[key] is not None
    }
    config = model.config.replace(**overrides)
    if config == model.config:
        return model
    graphdef, params = nnx.split(model, nnx.Param)
    new = build_model(config, _head(model))
    nnx.update(new, params)
    return new


def _head(model: nnx.Module) -> str:
    from longflax.modeling.encoder import head_of

    return head_of(model)


# ----------------------------------------------------------------------------------------------
# convert


def run_convert(context: RunContext) -> dict[str, Any]:
    from longflax.convert import convert_to_long

    c = context.config.convert
    stage_dir = context.stage_dir("convert")
    context.write_config("convert")
    if c.source == "scratch":
        model, tokenizer = scratch_model(context, c.head or "mlm")
    else:
        model, tokenizer = model_io.load(resolve_path(c.source), head=c.head or None)
        tokenizer = tokenizer or _tokenizer(context, None)
    source_length = model.config.max_sequence_length
    if c.max_length:
        model, _ = convert_to_long(
            model,
            max_length=c.max_length,
            attention_window=c.attention_window,
            max_global_tokens=c.max_global_tokens,
        )
        if tokenizer is not None:
            tokenizer.model_max_length = c.max_length
    model_io.save_model(
        stage_dir / "model", model, head=_head(model), tokenizer=tokenizer, metadata={"converted_from": c.source}
    )
    summary = {
        "source": c.source,
        "old_max_length": source_length,
        "new_max_length": model.config.max_sequence_length,
        "attention_window": c.attention_window if c.max_length else None,
    }
    logging.info("convert: %s", summary)
    return summary


# ----------------------------------------------------------------------------------------------
# mlm


class _MaskedBlocks:
    """Resumable MLM batches: blocks from a `BlockIterator`, masked per step on the host."""

    def __init__(self, iterator, *, tokenizer, vocab_size: int, max_predictions: int, probability: float, seed: int):
        self.iterator = iterator
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_predictions = max_predictions
        self.probability = probability
        self.seed = seed
        self.step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        from longflax.tasks.mlm import mask_tokens

        batch = next(self.iterator)
        masked = mask_tokens(
            batch.input_ids,
            batch.special_tokens_mask,
            seed=self.seed,
            step=self.step,
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=self.vocab_size,
            special_token_ids=self.tokenizer.all_special_ids,
            max_predictions=self.max_predictions,
            mask_probability=self.probability,
            attention_mask=batch.attention_mask,
            char_counts=batch.char_counts,
            byte_counts=batch.byte_counts,
        )
        self.step += 1
        return {
            "input_ids": masked.input_ids,
            "attention_mask": masked.attention_mask,
            "masked_positions": masked.masked_positions,
            "masked_labels": masked.masked_labels,
            "masked_weights": masked.masked_weights,
            "masked_char_counts": masked.masked_char_counts.astype(np.float32),
            "masked_byte_counts": masked.masked_byte_counts.astype(np.float32),
        }

    def state(self) -> dict[str, Any]:
        return {"iterator": self.iterator.state(), "step": self.step}

    def restore(self, state: dict[str, Any]) -> None:
        self.iterator.restore(state["iterator"])
        self.step = state["step"]


def mlm_loss_fn(model, batch, dropout_rng):
    from longflax.tasks.mlm import mlm_loss

    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        masked_positions=batch["masked_positions"],
        dropout_rng=dropout_rng,
    )
    sum_nll, num_tokens = mlm_loss(out.logits, batch["masked_labels"], batch["masked_weights"])
    return sum_nll, {"num_tokens": num_tokens}


def _load_blocks(context: RunContext, files, tokenizer, block_length: int):
    from longflax.data.text import build_blocks, read_documents

    c = context.config.mlm
    files = [files] if isinstance(files, str) else list(files)
    documents = read_documents([resolve_path(f) for f in files], layout=c.layout)
    return build_blocks(documents, tokenizer, block_length, cache_dir=context.workdir / "cache")


def evaluate_mlm(model, blocks, tokenizer, *, batch_size: int, max_predictions: int, probability: float, mesh, limit: int = 0):
    """Masked-LM evaluation with fixed masking (seed 0, step = batch index): loss, perplexity, bits."""
    from longflax import sharding
    from longflax.data.text import BlockIterator
    from longflax.tasks.mlm import LMMetrics, mlm_loss

    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def forward(params, batch):
        m = nnx.merge(graphdef, params)
        out = m(batch["input_ids"], batch["attention_mask"], masked_positions=batch["masked_positions"])
        weights = batch["masked_weights"] * batch["row_valid"][:, None]
        sum_nll, count = mlm_loss(out.logits, batch["masked_labels"], weights)
        return sum_nll, count, jnp.sum(batch["masked_char_counts"] * weights), jnp.sum(batch["masked_byte_counts"] * weights)

    iterator = BlockIterator(blocks, batch_size, seed=0, shuffle=False, drop_remainder=False, num_epochs=1)
    source = _MaskedBlocks(
        iterator, tokenizer=tokenizer, vocab_size=model.config.vocab_size, max_predictions=max_predictions, probability=probability, seed=0
    )
    metrics = LMMetrics()
    num_batches = iterator.batches_per_epoch if not limit else min(limit, iterator.batches_per_epoch)
    for _ in range(num_batches):
        batch = next(source)
        batch["row_valid"] = np.ones(batch["input_ids"].shape[0], np.float32)
        padded, valid = sharding.pad_batch(batch, mesh.devices.size)
        padded["row_valid"] = valid.astype(np.float32)
        sum_nll, count, chars, num_bytes = jax.device_get(forward(params, padded))
        metrics.update(sum_nll, count, num_characters=chars, num_bytes=num_bytes)
    return metrics.compute()


def run_mlm(context: RunContext) -> dict[str, Any]:
    from longflax.data.text import BlockIterator
    from longflax.tasks.mlm import default_max_predictions

    c = context.config.mlm
    stage_dir = context.stage_dir("mlm")
    context.write_config("mlm")
    model, tokenizer, source = initial_model(context, "mlm", "mlm")
    if tokenizer is None:
        raise ValueError("The MLM stage needs a tokenizer: the starting model has none; set config.tokenizer.")
    model = _apply_model_overrides(model, context)
    block_length = c.block_length or model.config.max_sequence_length
    if block_length > model.config.max_sequence_length:
        raise ValueError(
            f"mlm.block_length={block_length} exceeds the model's maximum of {model.config.max_sequence_length} tokens."
        )
    logging.info("mlm: starting from %s, blocks of %d tokens.", source, block_length)
    train_blocks = _load_blocks(context, c.train_files, tokenizer, block_length)
    eval_blocks = _load_blocks(context, c.eval_files, tokenizer, block_length) if c.eval_files else None
    # The jitted steps cannot check token ids, and XLA clamps out-of-range lookups silently.
    for blocks in (train_blocks, eval_blocks):
        if blocks is not None:
            validate_inputs(model.config, blocks.input_ids, blocks.attention_mask)
    max_predictions = c.max_predictions or default_max_predictions(block_length, c.mask_probability)

    def evaluate(m, step=None):
        if eval_blocks is None:
            return {}
        return evaluate_mlm(
            m, eval_blocks, tokenizer, batch_size=c.eval_batch_size, max_predictions=max_predictions,
            probability=c.mask_probability, mesh=context.mesh, limit=c.eval_batches,
        )

    before = evaluate(model) if not (stage_dir / "eval_before.json").exists() else json.loads((stage_dir / "eval_before.json").read_text())
    (stage_dir / "eval_before.json").write_text(json.dumps(before, indent=2))
    if before:
        logging.info("mlm: evaluation before training: %s", before)

    settings = _settings(context, "mlm", c.steps)
    trainer = Trainer(model, mlm_loss_fn, settings, mesh=context.mesh, stage_dir=stage_dir)
    _resume_source(context, "mlm", trainer)
    iterator = BlockIterator(train_blocks, c.batch_size, seed=context.config.seed, shuffle=True, drop_remainder=len(train_blocks) >= c.batch_size)
    batches = _MaskedBlocks(
        iterator, tokenizer=tokenizer, vocab_size=model.config.vocab_size, max_predictions=max_predictions,
        probability=c.mask_probability, seed=context.config.seed,
    )
    model = trainer.run(batches, evaluate=evaluate)
    if c.recopy_global_projections and model.config.attention == "longformer":
        _copy_local_to_global(model)
    after = evaluate(model)
    (stage_dir / "eval_after.json").write_text(json.dumps(after, indent=2))
    model_io.save_model(stage_dir / "model", model, head="mlm", tokenizer=tokenizer, metadata={"stage": "mlm", "steps": c.steps})
    summary = {"source": source, "steps": c.steps, "train_blocks": len(train_blocks), "eval_before": before, "eval_after": after}
    logging.info("mlm: done: %s", summary)
    return summary


def _copy_local_to_global(model: nnx.Module) -> None:
    """Copy each layer's trained local q/k/v into the global projections.

    Masked-LM training without global tokens gives the global projections no gradient, so
    they would keep their pre-training values; copying matches the original conversion recipe.
    """
    for layer in model.encoder.layers:
        attention = layer.attention
        for name in ("query", "key", "value"):
            local, glob = getattr(attention, name), getattr(attention, f"{name}_global")
            glob.kernel.set_value(jnp.array(local.kernel[...]))
            glob.bias.set_value(jnp.array(local.bias[...]))


# ----------------------------------------------------------------------------------------------
# qa


class _FeatureBatches:
    """Resumable QA training batches: features shuffled per epoch with a seed."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int):
        self.arrays = arrays
        self.batch_size = batch_size
        self.seed = seed
        self.count = len(next(iter(arrays.values())))
        if self.count < batch_size:
            raise ValueError(f"qa.batch_size={batch_size} is larger than the {self.count} training features.")
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.count)

    @property
    def batches_per_epoch(self) -> int:
        return self.count // self.batch_size

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > self.count:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._epoch_order()
        index = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return {k: v[index] for k, v in self.arrays.items()}

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order()


def qa_loss_fn(model, batch, dropout_rng):
    """Mean of the start and end cross-entropies per feature, summed over the batch."""
    import optax

    out = model(
        batch["input_ids"],
        batch["attention_mask"],
        batch["global_attention_mask"],
        batch["token_type_ids"],
        dropout_rng=dropout_rng,
    )
    # Padding is never part of a gold span, so masking it keeps probability mass on real tokens.
    valid = batch["attention_mask"] > 0
    start = jnp.where(valid, out.start_logits, -1e9)
    end = jnp.where(valid, out.end_logits, -1e9)
    loss = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(start, batch["start_positions"])
        + optax.softmax_cross_entropy_with_integer_labels(end, batch["end_positions"])
    )
    return jnp.sum(loss), {"num_tokens": jnp.asarray(loss.shape[0], jnp.float32)}


def row_multiple(max_length: int) -> int:
    """Return the multiple that QA feature rows are padded to.

    Rows are padded to the longest row of the set, rounded up to this multiple, instead of to
    `max_length`. Padding does not change the outputs. Single SQuAD paragraphs fill a fraction
    of `max_length=4096`: the 87,599 training questions average 173 real tokens, and padding
    them all to 4096 took 14.3 GiB of host memory.
    """
    return math.gcd(max_length, PAD_MULTIPLE)


def _feature_arrays(features, *, training: bool) -> dict[str, np.ndarray]:
    names = ["input_ids", "attention_mask", "global_attention_mask", "token_type_ids"]
    if training:
        names += ["start_positions", "end_positions"]
    return {name: np.asarray(getattr(features, name)).astype(np.int32) for name in names}


def _check_global_budget(model_config: ModelConfig, arrays: Mapping[str, np.ndarray]) -> None:
    # Every row is checked here because the jitted steps cannot check token ids, and XLA clamps
    # out-of-range lookups silently.
    validate_inputs(
        model_config, arrays["input_ids"], arrays["attention_mask"],
        arrays["global_attention_mask"] if model_config.attention == "longformer" else None,
        arrays["token_type_ids"],
    )
    if model_config.attention == "longformer":
        most = int((arrays["global_attention_mask"] * arrays["attention_mask"]).sum(axis=1).max())
        if most > model_config.max_global_tokens:
            raise ValueError(
                f"A feature has {most} global tokens but the model has max_global_tokens="
                f"{model_config.max_global_tokens}; lower qa.max_question_tokens."
            )


def load_examples(path: str, *, on_invalid: str, limit: int = 0, concat: Mapping[str, Any] | None = None):
    """Load a SQuAD-format set, optionally turned into k-context examples.

    `concat` holds `k`, `mode` ("original" or "shuffled") and, for "shuffled", `separator`,
    `gold_position` and `seed`. The limit applies after concatenation.
    """
    from longflax.data.squad import load_squad

    examples = load_squad(resolve_path(path), on_invalid=on_invalid)
    if concat and (concat.get("k", 1) > 1 or concat.get("mode") == "original"):
        from longflax.data.concat import build_concatenated

        mode = concat.get("mode", "shuffled")
        options = {} if mode == "original" else {
            "separator": concat.get("separator", "\n\n"),
            "gold_position": concat.get("gold_position", "random"),
            "seed": concat.get("seed", 0),
        }
        examples = build_concatenated(examples, k=concat["k"], mode=mode, **options)
    return examples[:limit] if limit else examples


def run_qa(context: RunContext) -> dict[str, Any]:
    from longflax.data.qa_features import prepare_qa_features

    c = context.config.qa
    stage_dir = context.stage_dir("qa")
    context.write_config("qa")
    model, tokenizer, source = initial_model(context, "qa", "qa")
    model = _apply_model_overrides(model, context)
    if tokenizer is None:
        raise ValueError("The QA stage needs a tokenizer: the starting model has none; set config.tokenizer.")
    max_length = min(c.max_length, model.config.max_sequence_length)
    examples = load_examples(c.train_file, on_invalid=c.on_invalid, limit=c.train_limit, concat=c.concat.to_dict())
    features = prepare_qa_features(
        examples, tokenizer, max_length=max_length, doc_stride=c.doc_stride,
        max_question_tokens=min(c.max_question_tokens, model.config.max_global_tokens - 1), training=True,
        pad_to_multiple_of=row_multiple(max_length),
    )
    arrays = _feature_arrays(features, training=True)
    _check_global_budget(model.config, arrays)
    batches = _FeatureBatches(arrays, c.batch_size, context.config.seed)
    total_steps = c.steps or max(1, int(math.ceil(c.epochs * batches.batches_per_epoch)))
    logging.info(
        "qa: %d examples -> %d features of %d tokens (longest row; max_length %d); %d steps of %d (%.2f epochs); "
        "starting from %s.",
        len(examples), batches.count, arrays["input_ids"].shape[1], max_length, total_steps, c.batch_size,
        total_steps / max(batches.batches_per_epoch, 1), source,
    )
    trainer = Trainer(model, qa_loss_fn, _settings(context, "qa", total_steps), mesh=context.mesh, stage_dir=stage_dir)
    _resume_source(context, "qa", trainer)
    model = trainer.run(batches)
    model_io.save_model(stage_dir / "model", model, head="qa", tokenizer=tokenizer, metadata={"stage": "qa", "steps": total_steps})
    return {"source": source, "examples": len(examples), "features": batches.count, "steps": total_steps}


# ----------------------------------------------------------------------------------------------
# evaluate


class QAPredictor:
    """Runs a QA model over every window of every example and decodes answers.

    The jitted forward pass is built once, so evaluating many sets of the same length
    compiles once per length.
    """

    def __init__(self, model, tokenizer, *, mesh, batch_size: int, max_question_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.max_question_tokens = max_question_tokens
        multiple = mesh.devices.size
        self.batch_size = max(multiple, batch_size // multiple * multiple)
        graphdef, self.params = nnx.split(model, nnx.Param)

        def forward(params, batch):
            out = nnx.merge(graphdef, params)(
                batch["input_ids"], batch["attention_mask"], batch["global_attention_mask"], batch["token_type_ids"]
            )
            return out.start_logits, out.end_logits

        self._forward = jax.jit(forward)

    def logits(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from tqdm import tqdm

        from longflax import sharding

        _check_global_budget(self.model.config, arrays)
        count, length = arrays["input_ids"].shape
        starts, ends = [], []
        for begin in tqdm(range(0, count, self.batch_size), desc="evaluate", unit="batch", leave=False):
            batch = {k: v[begin : begin + self.batch_size] for k, v in arrays.items()}
            rows = batch["input_ids"].shape[0]
            # The last batch is padded to the full batch size so one compiled shape serves every
            # batch. The padding rows are dropped again, so no feature is left out.
            padded, _ = sharding.pad_batch(batch, self.batch_size)
            start, end = jax.device_get(self._forward(self.params, padded))
            starts.append(start[:rows])
            ends.append(end[:rows])
        if not starts:
            return np.zeros((0, length), np.float32), np.zeros((0, length), np.float32)
        return np.concatenate(starts), np.concatenate(ends)

    def predict(self, examples, *, max_length: int, doc_stride: int, n_best_size: int, max_answer_length: int,
                rule: str = "context_span"):
        from longflax.data.qa_features import prepare_qa_features
        from longflax.tasks.qa_decode import decode_predictions

        features = prepare_qa_features(
            examples, self.tokenizer, max_length=max_length, doc_stride=doc_stride,
            max_question_tokens=self.max_question_tokens, training=False,
            pad_to_multiple_of=row_multiple(max_length),
        )
        start_logits, end_logits = self.logits(_feature_arrays(features, training=False))
        return decode_predictions(
            examples, features, start_logits, end_logits, n_best_size=n_best_size,
            max_answer_length=max_answer_length, rule=rule,
        )


def run_evaluate(context: RunContext) -> dict[str, Any]:
    from longflax import evaluate as scoring
    from longflax.tasks.qa_decode import write_predictions

    c = context.config.evaluate
    stage_dir = context.stage_dir("evaluate")
    context.write_config("evaluate")
    model, tokenizer, source = initial_model(context, "evaluate", "qa")
    predictor = QAPredictor(
        model, tokenizer, mesh=context.mesh, batch_size=c.batch_size,
        max_question_tokens=min(c.max_question_tokens, model.config.max_global_tokens - 1),
    )
    results: dict[str, Any] = {}
    for entry in c.sets:
        name = entry["name"]
        examples = load_examples(
            entry["file"], on_invalid="skip", limit=entry.get("limit") or 0, concat=entry.get("concat")
        )
        max_length = min(entry.get("max_length") or c.max_length, model.config.max_sequence_length)
        started = time.perf_counter()
        predictions, nbest = predictor.predict(
            examples, max_length=max_length, doc_stride=entry.get("doc_stride", c.doc_stride),
            n_best_size=c.n_best_size, max_answer_length=c.max_answer_length, rule=c.decode_rule,
        )
        write_predictions(stage_dir / name, predictions, nbest)
        rules = entry.get("rules", "squad")
        scores = scoring.score(examples, predictions, rules=rules, language=entry.get("language"))
        record = {**scores, "examples": len(examples), "max_length": max_length, "rules": rules,
                  "language": entry.get("language"), "seconds": time.perf_counter() - started}
        if any("gold_position" in ex.metadata for ex in examples):
            record["by_gold_position"] = scoring.score_by(
                examples, predictions, key=lambda ex: ex.metadata.get("gold_position")
            )
        results[name] = record
        logging.info("evaluate %s: EM %.2f F1 %.2f on %d examples", name, scores["exact_match"], scores["f1"], len(examples))
        print(f"{name:24s} EM {scores['exact_match']:6.2f}  F1 {scores['f1']:6.2f}  ({len(examples)} questions, {max_length} tokens)", flush=True)
    (stage_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return {"source": source, "results": results}


# ----------------------------------------------------------------------------------------------
# export


def run_export(context: RunContext) -> dict[str, Any]:
    from longflax.export import export_model

    c = context.config.export
    stage_dir = context.stage_dir("export")
    model, tokenizer, source = initial_model(context, "export", c.head or None)
    head = c.head or _head(model)
    output = export_model(model, stage_dir / "hf", head=head, tokenizer=tokenizer)
    summary: dict[str, Any] = {"source": source, "output": str(output), "head": head}
    if c.verify_examples and head == "qa":
        summary["verification"] = verify_export(context, model, tokenizer, output, c.verify_examples)
        (stage_dir / "verification.json").write_text(json.dumps(summary["verification"], indent=2))
    return summary


def verify_export(context: RunContext, model, tokenizer, directory: pathlib.Path, count: int) -> dict[str, Any]:
    """Reload a QA export with transformers (PyTorch) and compare its answers with longflax's.

    Uses the first `count` questions of the first evaluation set, with the same features and
    the same span decoding for both models.
    """
    try:
        import torch
        from transformers import AutoModelForQuestionAnswering
    except ImportError as error:
        raise ValueError("export.verify_examples needs torch and transformers (pip install 'longflax[torch]').") from error
    from longflax.data.qa_features import prepare_qa_features
    from longflax.tasks.qa_decode import decode_predictions

    entry = context.config.evaluate.sets[0]
    examples = load_examples(entry["file"], on_invalid="skip", limit=count, concat=entry.get("concat"))
    max_length = min(entry.get("max_length") or context.config.evaluate.max_length, model.config.max_sequence_length)
    features = prepare_qa_features(
        examples, tokenizer, max_length=max_length, doc_stride=entry.get("doc_stride", 128),
        max_question_tokens=min(context.config.evaluate.max_question_tokens, model.config.max_global_tokens - 1),
        training=False,
    )
    arrays = _feature_arrays(features, training=False)
    ours = model(arrays["input_ids"], arrays["attention_mask"], arrays["global_attention_mask"], arrays["token_type_ids"])
    hf_model, info = AutoModelForQuestionAnswering.from_pretrained(str(directory), output_loading_info=True)
    hf_model.eval()
    inputs = {k: torch.as_tensor(v, dtype=torch.long) for k, v in arrays.items()}
    if model.config.attention != "longformer":
        inputs.pop("global_attention_mask")
    with torch.no_grad():
        theirs = hf_model(**inputs)
    ours_start, ours_end = np.asarray(ours.start_logits), np.asarray(ours.end_logits)
    theirs_start, theirs_end = theirs.start_logits.numpy(), theirs.end_logits.numpy()
    valid = arrays["attention_mask"].astype(bool)
    difference = float(max(np.abs(ours_start - theirs_start)[valid].max(), np.abs(ours_end - theirs_end)[valid].max()))
    ours_answers, _ = decode_predictions(examples, features, ours_start, ours_end)
    theirs_answers, _ = decode_predictions(examples, features, theirs_start, theirs_end)
    same = sum(ours_answers[k] == theirs_answers.get(k) for k in ours_answers)
    result = {
        "questions": len(examples),
        "same_answers": same,
        "max_abs_logit_difference": difference,
        "missing_keys": list(info["missing_keys"]),
        "unexpected_keys": list(info["unexpected_keys"]),
        "hf_class": type(hf_model).__name__,
    }
    logging.info("export check: %s", result)
    print(f"export check: {same}/{len(examples)} identical answers, max |logit difference| {difference:.2e}", flush=True)
    return result


RUNNERS = {"convert": run_convert, "mlm": run_mlm, "qa": run_qa, "evaluate": run_evaluate, "export": run_export}
