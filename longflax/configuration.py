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
    # Dropout rates left as None keep the checkpoint's own values.
    config.model = ml_collections.ConfigDict(
        {
            "dtype": "float32",
            "remat": "none",
            "scan_layers": False,
            "dropout_rate": ml_collections.config_dict.placeholder(float),
            "attention_dropout_rate": ml_collections.config_dict.placeholder(float),
        }
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
    # verify_examples > 0 reloads the export with transformers (PyTorch) and checks that it
    # gives the same answers as longflax on that many evaluation questions.
    config.export = ml_collections.ConfigDict({"head": "", "init_from": "", "verify_examples": 0})
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


# ----------------------------------------------------------------------------------------------
# The small variant of every experiment config

# Long-context models of the small variant: 1024 positions (extended from 514, as the full
# recipe extends 514 to 4098) with a two-sided window of 64 tokens.
SMALL_MAX_LENGTH = 1024
SMALL_ATTENTION_WINDOW = 64
SMALL_MAX_GLOBAL_TOKENS = 48


def small_variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrink an experiment config in place to a run of a few minutes on a 2-core CPU.

    The small variant keeps the experiment's stages, long-context conversion, concatenation
    and evaluation rules, but swaps in:

    * a random tiny model (`convert.source = "scratch"`, 2 layers of width 64) with the
      RoBERTa tokenizer from `data:tokenizers/roberta-base`, in float32;
    * 1024 positions and a window of 64 when the experiment converts to a long model
      (`convert.max_length > 0`), else a 514-position full-attention model;
    * local data: a Project Gutenberg novel for MLM training, the WikiText-2 validation
      split for MLM evaluation, the first 44 articles of SQuAD v1.1 train for QA, and at
      most 16 questions per evaluation set;
    * a few tens of training steps.

    A run that starts from an outside model (`<stage>.init_from`) starts from the tiny model
    instead: the stages become `convert` followed by the experiment's other stages, and an
    evaluation-only experiment gains a `qa` stage so that it has a QA model to evaluate.
    Evaluation sets stay as they are, so a config whose sets are not in the data folder must
    pick local ones for its small variant.

    Args:
        config: A config built from `base_config()`; it is changed in place.

    Returns:
        The same config, for chaining.
    """
    _small_stages(config)
    _small_model(config)
    _small_mlm(config)
    _small_qa(config)
    _small_evaluate(config)
    config.log_every = 5
    config.checkpoint.every = 10
    return config


def _small_stages(config: ml_collections.ConfigDict) -> None:
    stages = [stage for stage in config.stages if stage != "convert"]
    if "evaluate" in stages and "qa" not in stages:
        stages.insert(stages.index("evaluate"), "qa")
    config.stages = ("convert", *stages)
    for stage in ("mlm", "qa", "evaluate", "export"):
        config[stage].init_from = ""
    for stage in ("mlm", "qa"):
        config[stage].resume_from = ""


def _small_model(config: ml_collections.ConfigDict) -> None:
    config.tokenizer = "data:tokenizers/roberta-base"
    config.model.dtype = "float32"
    config.scratch.family = "roberta"
    config.scratch.hidden_size = 64
    config.scratch.num_layers = 2
    config.scratch.num_heads = 4
    config.scratch.mlp_dim = 128
    config.scratch.max_position_embeddings = 514
    config.convert.source = "scratch"
    if config.convert.max_length:
        config.convert.max_length = SMALL_MAX_LENGTH
        config.convert.attention_window = SMALL_ATTENTION_WINDOW
        config.convert.max_global_tokens = SMALL_MAX_GLOBAL_TOKENS


def _model_length(config: ml_collections.ConfigDict) -> int:
    # RoBERTa-style position ids start at 2, so 514 rows hold 512 tokens.
    return config.convert.max_length or config.scratch.max_position_embeddings - 2


def _small_mlm(config: ml_collections.ConfigDict) -> None:
    mlm = config.mlm
    mlm.train_files = ("data:text/gutenberg/pg84.txt",)
    mlm.eval_files = ("data:text/wikitext-2/wiki.valid.tokens.gz",)
    mlm.layout = "paragraphs"
    # Batches of 8 split evenly over up to 8 devices (an 8-chip host, or 8 fake CPU devices).
    mlm.block_length = 128
    mlm.num_microbatches = 2 if mlm.num_microbatches > 1 else 1
    # Eight rows per micro-batch, so each of up to 8 data-parallel devices gets one.
    mlm.batch_size = 8 * mlm.num_microbatches
    mlm.steps = 30
    mlm.warmup_steps = 5
    mlm.learning_rate = 5e-4
    mlm.eval_every = 15
    mlm.eval_batch_size = 8
    mlm.eval_batches = 4


def _small_qa(config: ml_collections.ConfigDict) -> None:
    qa = config.qa
    qa.train_file = "data:squad/train-v1.1-first44articles.json"
    qa.train_limit = 128
    qa.max_length = min(qa.max_length, _model_length(config))
    qa.max_question_tokens = min(qa.max_question_tokens, SMALL_MAX_GLOBAL_TOKENS - 8)
    qa.num_microbatches = 2 if qa.num_microbatches > 1 else 1
    qa.batch_size = 8 * qa.num_microbatches
    qa.steps = 20
    qa.learning_rate = 3e-4


def _small_evaluate(config: ml_collections.ConfigDict) -> None:
    evaluate = config.evaluate
    evaluate.max_length = min(evaluate.max_length, _model_length(config))
    evaluate.max_question_tokens = min(evaluate.max_question_tokens, SMALL_MAX_GLOBAL_TOKENS - 8)
    evaluate.batch_size = 8
    sets = []
    for entry in evaluate.sets:
        entry = dict(entry)
        entry["limit"] = min(entry.get("limit") or 16, 16)
        if entry.get("max_length"):
            entry["max_length"] = min(entry["max_length"], _model_length(config))
        sets.append(entry)
    evaluate.sets = sets


def long_mlm_config(source: str, argument: str = "", *, config_name: str) -> ml_collections.ConfigDict:
    """Build the convert + masked-LM config shared by the RoBERTa-Long and XLM-R-Long experiments.

    `argument` is the config-file argument: empty, or "small" for the small variant.
    """
    options = [option for option in argument.split(",") if option]
    unknown = sorted(set(options) - {"small"})
    if unknown:
        raise ValueError(
            f"Unknown config argument {unknown} in {argument!r}. The only option is 'small', "
            f"as in {config_name}:small."
        )
    config = base_config()
    config.stages = ("convert", "mlm")
    config.model.dtype = "bfloat16"
    config.convert.source = source
    config.convert.head = "mlm"
    config.convert.max_length = 4096
    config.convert.attention_window = 512
    config.mlm.learning_rate = 3e-5
    config.mlm.warmup_steps = 500
    config.mlm.batch_size = 64
    config.mlm.num_microbatches = 64
    config.mlm.steps = 6000
    config.mlm.eval_every = 500
    if "small" in options:
        small_variant(config)
    return config
