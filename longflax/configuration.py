"""Experiment settings: the base `ConfigDict` every config starts from, and its validation.

Data paths may be written as `data:RELATIVE/PATH`: they are looked up under
`$LONGFLAX_DATA_DIR` (a folder laid out like `squad/dev-v1.1.json.gz`) or downloaded from their
official source. Every other path is used as given.
"""

from __future__ import annotations

import ml_collections

STAGES = ("convert", "mlm", "qa", "evaluate", "export")

VARIANTS = ("full", "small", "tiny")


def _optimisation(**overrides) -> ml_collections.ConfigDict:
    settings = dict(
        learning_rate=3e-5,
        warmup_steps=-1,  # -1: use warmup_ratio
        warmup_ratio=0.1,
        decay="linear",
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        max_grad_norm=1.0,
        batch_size=32,
        num_microbatches=1,
        init_from="",
        resume_from="",
    )
    settings.update(overrides)
    return ml_collections.ConfigDict(settings)


def base_config() -> ml_collections.ConfigDict:
    """Every key a config may set, with defaults; configs change values, never add keys."""
    config = ml_collections.ConfigDict()
    config.stages = ("convert", "mlm", "qa", "evaluate", "export")
    config.seed = 0
    config.tokenizer = ""  # Tokenizer directory or hub id when the model directory has none.
    config.log_every = 10
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 2, "keep_every": 0})
    # Run-time model settings applied to whatever weights a stage loads.
    config.model = ml_collections.ConfigDict(
        {"dtype": "float32", "remat": "none", "scan_layers": False}
    )
    # Architecture of a randomly initialised model (convert.source = "scratch" or
    # <stage>.init_from = "scratch"); vocabulary and special ids come from the tokenizer.
    config.scratch = ml_collections.ConfigDict(
        {
            "family": "roberta",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 4,
            "mlp_dim": 128,
            "max_position_embeddings": 514,
            "type_vocab_size": 1,
            "layer_norm_eps": 1e-5,
        }
    )
    config.convert = ml_collections.ConfigDict(
        {
            "source": "xlm-roberta-base",
            "head": "mlm",
            "max_length": 4096,  # 0 keeps the source model unchanged (a full-attention baseline).
            "attention_window": 512,
            "max_global_tokens": 64,
        }
    )
    config.mlm = _optimisation(
        learning_rate=3e-5,
        warmup_steps=500,
        batch_size=64,
        train_files=("hf:wikitext:wikitext-103-raw-v1:train",),
        eval_files=("hf:wikitext:wikitext-103-raw-v1:validation",),
        layout="wikitext",
        block_length=0,  # 0: the model's maximum length.
        mask_probability=0.15,
        max_predictions=0,  # 0: derived from block_length and mask_probability.
        steps=6000,
        eval_every=0,
        eval_batch_size=8,
        eval_batches=0,  # 0: the whole evaluation text.
        freeze_global_projections=True,
        recopy_global_projections=True,
    )
    config.qa = _optimisation(
        learning_rate=3e-5,
        warmup_ratio=0.0,
        warmup_steps=-1,
        batch_size=32,
        train_file="data:squad/train-v1.1.json",
        train_limit=0,
        on_invalid="skip",
        max_length=512,
        doc_stride=128,
        max_question_tokens=64,
        # k > 1 turns each training example into k concatenated contexts (see data.concat).
        concat=ml_collections.ConfigDict({"k": 1, "mode": "shuffled", "separator": "\n\n", "gold_position": "random", "seed": 0}),
        epochs=3.0,
        steps=0,  # 0: derived from epochs.
    )
    config.evaluate = ml_collections.ConfigDict(
        {
            "sets": [{"name": "squad-dev", "file": "data:squad/dev-v1.1.json", "rules": "squad", "language": "en", "limit": 0, "max_length": 0, "doc_stride": 128}],
            "max_length": 512,
            "doc_stride": 128,
            "max_question_tokens": 64,
            "batch_size": 32,
            "n_best_size": 20,
            "max_answer_length": 30,
            "decode_rule": "context_span",
            # A QA model to evaluate; empty means the qa stage's model of this run.
            "init_from": "",
        }
    )
    config.export = ml_collections.ConfigDict({"head": "", "init_from": ""})
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check a resolved config before any work starts.

    Raises:
        ValueError: naming the field, its value and the fix.
    """
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"stages contains {unknown}; the stages are {list(STAGES)}.")
    order = [STAGES.index(s) for s in config.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ValueError(f"stages={list(config.stages)} must be in the order {list(STAGES)}, each at most once.")
    for stage in ("mlm", "qa"):
        c = config[stage]
        if c.resume_from and c.init_from:
            raise ValueError(
                f"{stage}.resume_from and {stage}.init_from are both set; give only one: resume_from "
                "continues an earlier run of this stage, init_from starts a new one from a model."
            )
        if c.batch_size < 1 or c.num_microbatches < 1 or c.batch_size % c.num_microbatches:
            raise ValueError(
                f"{stage}.batch_size={c.batch_size} must be a positive multiple of "
                f"{stage}.num_microbatches={c.num_microbatches}."
            )
        if c.learning_rate <= 0:
            raise ValueError(f"{stage}.learning_rate={c.learning_rate} must be positive.")
    if config.mlm.steps < 1 and "mlm" in config.stages:
        raise ValueError(f"mlm.steps={config.mlm.steps} must be at least 1.")
    if not 0 < config.mlm.mask_probability < 1:
        raise ValueError(f"mlm.mask_probability={config.mlm.mask_probability} must be in (0, 1).")
    if config.qa.doc_stride < 0:
        raise ValueError(f"qa.doc_stride={config.qa.doc_stride} must be >= 0 (0 keeps only the first window).")
    if config.qa.epochs <= 0 and config.qa.steps <= 0 and "qa" in config.stages:
        raise ValueError("qa.epochs and qa.steps are both 0; set one of them.")
    if config.convert.max_length and config.convert.attention_window % 2:
        raise ValueError(
            f"convert.attention_window={config.convert.attention_window} must be even: it is the full "
            "two-sided width."
        )
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype={config.model.dtype!r} must be 'float32' or 'bfloat16'.")
    if config.model.remat not in ("none", "full", "dots"):
        raise ValueError(f"model.remat={config.model.remat!r} must be 'none', 'full' or 'dots'.")
    sizes = [v for v in config.mesh.values()]
    if sizes.count(-1) > 1 or any(v == 0 or v < -1 for v in sizes):
        raise ValueError(f"mesh={dict(config.mesh)}: sizes must be positive, with at most one -1.")
    for entry in config.evaluate.sets:
        missing = {"name", "file"} - set(entry)
        if missing:
            raise ValueError(f"evaluate.sets entry {dict(entry)} lacks {sorted(missing)}.")
        if entry.get("rules", "squad") not in ("squad", "mlqa"):
            raise ValueError(f"evaluate.sets {entry['name']}: rules={entry['rules']!r} must be 'squad' or 'mlqa'.")
        if entry.get("rules") == "mlqa" and not entry.get("language"):
            raise ValueError(f"evaluate.sets {entry['name']}: the mlqa rules need a language.")


def resolve_path(path: str) -> str:
    """Resolve a `data:` path through `LONGFLAX_DATA_DIR` or the official download."""
    if path.startswith("data:"):
        from longflax.data.squad import resolve_data_file

        return str(resolve_data_file(path[len("data:") :]))
    return path
