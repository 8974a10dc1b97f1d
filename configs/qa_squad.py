"""Fine-tune extractive QA on SQuAD v1.1 train and evaluate on SQuAD v1.1 dev.

The config argument is `MODEL,LENGTH[,small]`. MODEL is roberta, xlmr, roberta-long or
xlmr-long, and LENGTH is 512 or 4096 (4096 only for the long models). Without an argument the
config is `xlmr-long,4096`:

    python -m longflax.train --config configs/qa_squad.py:xlmr,512 --workdir runs/qa-squad-xlmr-512
    python -m longflax.train --config configs/qa_squad.py:xlmr-long,4096 \
        --workdir runs/qa-squad-xlmr-long-4096 \
        --config.qa.init_from=runs/xlmr-long-mlm/mlm/model

roberta and xlmr start from the hub checkpoints roberta-base and xlm-roberta-base. The long
models start from the model directory of an MLM run (`configs/roberta_long_mlm.py`,
`configs/xlmr_long_mlm.py`); `qa.init_from` defaults to `runs/<model>-mlm/mlm/model`, the
directory those configs' commands write, and `--config.qa.init_from=DIR` points it elsewhere.
Pass `--config.seed=N` for the five seeds of a setting, or use `launch/seeds.sh`.

Small variant (a random tiny model trained on 128 questions, a few minutes on a CPU):

    python -m longflax.train --config configs/qa_squad.py:xlmr-long,4096,small \
        --workdir runs/qa-squad-small

Original hyperparameters: AdamW with learning rate 3e-5, eps 1e-6, betas (0.9, 0.999) and
weight decay 0.01, no warm-up and linear decay, 3 epochs, mixed precision (bfloat16 here), total
batch 32: 32 x 1 for roberta and roberta-long at 512 tokens, 4 x accumulation 8 for the
multilingual models at 512 tokens, and 1 x accumulation 32 with full rematerialisation
(gradient checkpointing) at 4096 tokens. `doc_stride=0` keeps only the first window of a long
context, as the original did; `--config.qa.doc_stride=128 --config.evaluate.doc_stride=128`
gives our better default, overlapping windows that cover the whole context. The original
lower-cased the text for the RoBERTa and XLM-R models; here casing is a property of the
tokenizer (both tokenizers are cased), not a config key.

The official SQuAD v1.1 train file is downloaded unless `$LONGFLAX_DATA_DIR/squad/` has it.
"""

from longflax.configuration import base_config, small_variant

# model name -> (hub checkpoint it comes from, longest QA length, whether it is multilingual)
MODELS = {
    "roberta": ("roberta-base", 512, False),
    "xlmr": ("xlm-roberta-base", 512, True),
    "roberta-long": ("roberta-base", 4096, False),
    "xlmr-long": ("xlm-roberta-base", 4096, True),
}
LENGTHS = (512, 4096)


def parse_argument(argument: str) -> tuple[str, int, bool]:
    """Split `MODEL,LENGTH[,small]` into the model name, the length and the small flag.

    Raises:
        ValueError: If the model or the length is unknown, or the model is shorter than LENGTH.
    """
    options = [option.strip() for option in argument.split(",") if option.strip()]
    small = "small" in options
    options = [option for option in options if option != "small"]
    if len(options) != 2:
        raise ValueError(
            f"Config argument {argument!r} is invalid: expected MODEL,LENGTH[,small], for "
            "example xlmr-long,4096 or xlmr,512,small."
        )
    model, length_text = options
    if model not in MODELS:
        raise ValueError(
            f"Unknown model {model!r} in the config argument. Use one of {list(MODELS)}."
        )
    if not length_text.isdigit() or int(length_text) not in LENGTHS:
        raise ValueError(
            f"Unknown length {length_text!r} in the config argument. Use one of {list(LENGTHS)}."
        )
    length = int(length_text)
    if length > MODELS[model][1]:
        raise ValueError(
            f"Model {model!r} reads at most {MODELS[model][1]} tokens, so length {length} is "
            f"invalid; use {model}-long for {length} tokens."
        )
    return model, length, small


def build_config(model: str, length: int, small: bool):
    """Build the QA config of one model and length; `configs/qa_sq3.py` extends it."""
    checkpoint, max_length, multilingual = MODELS[model]
    config = base_config()
    config.stages = ("qa", "evaluate")
    config.model.dtype = "bfloat16"
    # The convert stage does not run here, but convert.* records the architecture, which
    # the small variant copies.
    config.convert.source = checkpoint
    config.convert.max_length = max_length if max_length > 512 else 0
    if max_length > 512:
        config.qa.init_from = f"runs/{model}-mlm/mlm/model"
    else:
        config.qa.init_from = checkpoint

    qa = config.qa
    qa.learning_rate = 3e-5
    qa.eps = 1e-6
    qa.weight_decay = 0.01
    qa.warmup_steps = 0
    qa.epochs = 3.0
    qa.batch_size = 32
    qa.max_length = length
    qa.doc_stride = 0
    if length > 512:
        qa.num_microbatches = 32
        config.model.remat = "full"
    else:
        qa.num_microbatches = 8 if multilingual else 1

    config.evaluate.max_length = length
    config.evaluate.doc_stride = 0
    config.evaluate.batch_size = 32 if length <= 512 else 8
    config.evaluate.sets = [
        {
            "name": "squad-dev",
            "file": "data:squad/dev-v1.1.json",
            "rules": "squad",
            "language": "en",
        }
    ]
    if small:
        small_variant(config)
    return config


def get_config(argument: str = "xlmr-long,4096"):
    return build_config(*parse_argument(argument))
