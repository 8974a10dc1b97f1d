"""Zero-shot XQuAD and XQ3 evaluation of a QA model trained on English SQuAD or SQ3.

The config argument is `[LENGTH][,small]` with LENGTH 512 (the default) or 4096, the number of
tokens the model reads per window. The QA model comes from `--config.evaluate.init_from`, for
example the model directory of a `configs/qa_squad.py` or `configs/qa_sq3.py` run:

    python -m longflax.train --config configs/eval_xquad.py --workdir runs/eval-xquad-xlmr-512 \
        --config.evaluate.init_from=runs/qa-squad-xlmr-512/qa/model
    python -m longflax.train --config configs/eval_xquad.py:4096 \
        --workdir runs/eval-xquad-xlmr-long-4096 \
        --config.evaluate.init_from=runs/qa-sq3-xlmr-long-4096/qa/model

Evaluates XQuAD (1,190 questions per language) in the 11 languages ar, de, el, en, es, hi, ru,
th, tr, vi and zh, and XQ3 in the same languages: three XQuAD contexts per example, built with
the `original` construction of SQ3 (first question of each paragraph, consecutive groups of
three, no separator). Scores use the official SQuAD v1.1 rules in every language, as the
XQuAD authors do. `doc_stride=0` keeps only the first window of a long context, as the
original did; `--config.evaluate.doc_stride=128` covers the whole context with overlapping
windows, our better default.

Small variant (a random tiny QA model trained for a few steps, then 16 questions per set; it
runs `convert`, `qa` and `evaluate` because there is no trained model to evaluate):

    python -m longflax.train --config configs/eval_xquad.py:small --workdir runs/eval-xquad-small
"""

from longflax.configuration import base_config, small_variant

LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
LENGTHS = (512, 4096)


def get_config(argument: str = ""):
    options = [option.strip() for option in argument.split(",") if option.strip()]
    small = "small" in options
    lengths = [option for option in options if option != "small"]
    if len(lengths) > 1 or (lengths and lengths[0] not in [str(n) for n in LENGTHS]):
        raise ValueError(
            f"Config argument {argument!r} is invalid: expected [LENGTH][,small] with LENGTH one "
            f"of {list(LENGTHS)}, for example 4096 or 4096,small."
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
    xquad = [
        {
            "name": f"xquad-{language}",
            "file": f"data:xquad/xquad.{language}.json",
            "rules": "squad",
            "language": language,
        }
        for language in LANGUAGES
    ]
    xq3 = [
        {**entry, "name": f"xq3-{entry['language']}", "concat": {"k": 3, "mode": "original"}}
        for entry in xquad
    ]
    evaluate.sets = xquad + xq3
    if small:
        small_variant(config)
    return config
