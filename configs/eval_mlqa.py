"""Zero-shot MLQA evaluation of a QA model trained on English SQuAD.

The config argument is `[LENGTH][,test][,small]`: LENGTH is 512 (the default) or 4096 tokens
per window, and `test` scores the MLQA test split instead of the dev split (the original
scored dev). The QA model comes from `--config.evaluate.init_from`:

    python -m longflax.train --config configs/eval_mlqa.py --workdir runs/eval-mlqa-xlmr-512 \
        --config.evaluate.init_from=runs/qa-squad-xlmr-512/qa/model
    python -m longflax.train --config configs/eval_mlqa.py:4096,test \
        --workdir runs/eval-mlqa-xlmr-long-4096-test \
        --config.evaluate.init_from=runs/qa-squad-xlmr-long-4096/qa/model

Evaluates the seven MLQA languages ar, de, en, es, hi, vi and zh, with context and question in
the same language, under the official MLQA rules of each language (Unicode punctuation and the
language's articles removed; Chinese scored per character). The original applied the English
SQuAD rules to every language. The German dev set is read from the data folder
(`mlqa/dev-context-de-question-de.from-hf-arrow.json`). Every other file is downloaded from the
official MLQA archive unless the data folder has it. `doc_stride=0` keeps only the first
window of a long context, as the original did; `--config.evaluate.doc_stride=128` covers the
whole context, our better default.

Small variant (a random tiny QA model trained for a few steps, then 16 German dev questions,
the only MLQA file available offline; it runs `convert`, `qa` and `evaluate`):

    python -m longflax.train --config configs/eval_mlqa.py:small --workdir runs/eval-mlqa-small
"""

from longflax.configuration import base_config, small_variant

LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
LENGTHS = (512, 4096)
# The only MLQA file in the data folder: the German dev set, regrouped into SQuAD format.
LOCAL_GERMAN_DEV = "data:mlqa/dev-context-de-question-de.from-hf-arrow.json"


def mlqa_file(split: str, language: str) -> str:
    """Return the `data:` path of an MLQA split with context and question in `language`."""
    if split == "dev" and language == "de":
        return LOCAL_GERMAN_DEV
    return f"data:mlqa/{split}-context-{language}-question-{language}.json"


def get_config(argument: str = ""):
    options = [option.strip() for option in argument.split(",") if option.strip()]
    small = "small" in options
    split = "test" if "test" in options else "dev"
    lengths = [option for option in options if option not in ("small", "test")]
    if len(lengths) > 1 or (lengths and lengths[0] not in [str(n) for n in LENGTHS]):
        raise ValueError(
            f"Config argument {argument!r} is invalid: expected [LENGTH][,test][,small] with "
            f"LENGTH one of {list(LENGTHS)}, for example 4096,test."
        )
    length = int(lengths[0]) if lengths else 512

    config = base_config()
    config.stages = ("evaluate",)
    config.model.dtype = "bfloat16"
    # The convert stage does not run here, but convert.* records the architecture, which
    # the small variant copies.
    config.convert.max_length = 4096 if length > 512 else 0
    evaluate = config.evaluate
    evaluate.max_length = length
    evaluate.doc_stride = 0
    evaluate.batch_size = 32 if length <= 512 else 8
    languages = ("de",) if small else LANGUAGES
    evaluate.sets = [
        {
            "name": f"mlqa-{'dev' if small else split}-{language}",
            "file": mlqa_file("dev" if small else split, language),
            "rules": "mlqa",
            "language": language,
        }
        for language in languages
    ]
    if small:
        small_variant(config)
    return config
