"""Exact match and F1 for extractive QA, following the official SQuAD v1.1 and MLQA rules.

SQuAD v1.1 rules (also used for XQuAD, TyDi QA GoldP and the concatenated sets): lower-case,
remove ASCII punctuation (Python's `string.punctuation`, so "«", "–" and other non-ASCII marks
stay), remove the whole words "a", "an" and "the", and collapse whitespace. F1 counts common
whitespace tokens. Each question scores the best value over its gold answers, and a question
without a prediction scores 0 and still counts in the denominator. Scores are percentages.

MLQA rules (language-aware): lower-case, and remove every Unicode punctuation character (general
category P*) and every ASCII punctuation character. Then replace the language's articles by a
space: en, es, de and vi have word lists, ar replaces every occurrence of the substring "ال"
(not only the prefix), and hi and zh have none. Finally split on whitespace; for zh every CJK
character in U+4E00..U+9FA5 is also a token of its own.

Command line:

    python -m longflax.evaluate --data dev-v1.1.json --predictions predictions.json
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import pathlib
import re
import statistics
import string
import sys
import unicodedata
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal

from absl import logging

from longflax.data.squad import QAExample, load_squad

__all__ = [
    "MLQA_LANGUAGES",
    "aggregate_runs",
    "exact_match_score",
    "f1_score",
    "format_markdown_table",
    "main",
    "normalize_answer",
    "score",
    "score_by",
    "score_squad",
]

Rules = Literal["squad", "mlqa"]

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")

# Articles removed by the MLQA rules, per language. None means the language has no article
# rule; ar is handled in `_normalize_mlqa`.
_MLQA_ARTICLES: dict[str, re.Pattern[str] | None] = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "de": re.compile(r"\b(ein|eine|einer|eines|einem|einen|der|die|das|des|dem|den)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "ar": None,
    "hi": None,
    "zh": None,
}
MLQA_LANGUAGES = tuple(sorted(_MLQA_ARTICLES))
_CJK_LOW, _CJK_HIGH = "\u4e00", "\u9fa5"


# --------------------------------------------------------------------------------------------
# Normalisation and per-answer scores


def _is_mlqa_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def _check_language(language: str | None) -> str:
    if language not in _MLQA_ARTICLES:
        raise ValueError(
            f"MLQA rules need a supported language; got {language!r}. Supported languages: "
            f"{', '.join(MLQA_LANGUAGES)}. For other languages use rules='squad'."
        )
    return language


def _segment_mixed(text: str) -> list[str]:
    """Split on whitespace, making every CJK character (U+4E00..U+9FA5) its own token."""
    tokens: list[str] = []
    pending: list[str] = []
    for char in text:
        if _CJK_LOW <= char <= _CJK_HIGH:
            tokens.extend("".join(pending).split())
            pending = []
            tokens.append(char)
        else:
            pending.append(char)
    tokens.extend("".join(pending).split())
    return tokens


def _normalize_squad(text: str) -> str:
    text = text.lower()
    text = "".join(char for char in text if char not in _ASCII_PUNCTUATION)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _normalize_mlqa(text: str, language: str) -> str:
    text = text.lower()
    text = "".join(char for char in text if not _is_mlqa_punctuation(char))
    articles = _MLQA_ARTICLES[language]
    if articles is not None:
        text = articles.sub(" ", text)
    elif language == "ar":
        # The official rule replaces the substring "ال" anywhere, also inside words.
        text = text.replace("ال", " ")
    tokens = _segment_mixed(text) if language == "zh" else text.split()
    return " ".join(tokens)


def normalize_answer(text: str, *, rules: Rules = "squad", language: str | None = None) -> str:
    """Normalise an answer string for comparison.

    Args:
        text: A predicted or gold answer.
        rules: "squad" for the SQuAD v1.1 rules, "mlqa" for the MLQA rules.
        language: ISO 639-1 code of the text, required with rules="mlqa" (see MLQA_LANGUAGES).

    Returns:
        The normalised text, tokens joined by single spaces.

    Raises:
        ValueError: If the rules are unknown, or rules="mlqa" and the language is unsupported.
    """
    if rules == "squad":
        return _normalize_squad(text)
    if rules == "mlqa":
        return _normalize_mlqa(text, _check_language(language))
    raise ValueError(f"rules must be 'squad' or 'mlqa', got {rules!r}.")


def exact_match_score(
    prediction: str, gold: str, *, rules: Rules = "squad", language: str | None = None
) -> float:
    """Return 1.0 if the normalised prediction equals the normalised gold answer, else 0.0.

    Two answers that both normalise to the empty string match, as in the official scripts.
    """
    normalized_prediction = normalize_answer(prediction, rules=rules, language=language)
    normalized_gold = normalize_answer(gold, rules=rules, language=language)
    return float(normalized_prediction == normalized_gold)


def f1_score(
    prediction: str, gold: str, *, rules: Rules = "squad", language: str | None = None
) -> float:
    """Return the token F1 between a prediction and one gold answer, in [0, 1].

    Tokens are the whitespace-separated pieces of the normalised strings, counted with
    multiplicity. An empty side gives 0, also when both are empty, as in the official scripts.
    """
    prediction_tokens = normalize_answer(prediction, rules=rules, language=language).split()
    gold_tokens = normalize_answer(gold, rules=rules, language=language).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_common = sum(common.values())
    if num_common == 0:
        return 0.0
    precision = num_common / len(prediction_tokens)
    recall = num_common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Data-set scores


def _check_predictions(predictions: Mapping[str, Any]) -> None:
    if not isinstance(predictions, Mapping):
        raise ValueError(
            "predictions must map question id to predicted answer text, got "
            f"{type(predictions).__name__}."
        )
    for question_id, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(
                f"The prediction for question {question_id!r} is {type(text).__name__} "
                f"{text!r}; every prediction must be the answer text (a string)."
            )


def _example_language(example: QAExample, rules: Rules, language: str | None) -> str | None:
    """Return the language to score an example with: the argument, else its metadata."""
    if rules != "mlqa" or language is not None:
        return language
    from_metadata = example.metadata.get("language")
    if from_metadata is None:
        raise ValueError(
            f"rules='mlqa' needs a language, but none was given and example {example.id!r} "
            "has no 'language' metadata. Pass language= (for example language='de')."
        )
    return from_metadata


def _score_examples(
    examples: Sequence[QAExample],
    predictions: Mapping[str, str],
    rules: Rules,
    language: str | None,
) -> tuple[list[float], list[float]]:
    """Return per-example EM and F1 in [0, 1]; examples without a prediction score 0."""
    if rules not in ("squad", "mlqa"):
        raise ValueError(f"rules must be 'squad' or 'mlqa', got {rules!r}.")
    exact_matches, f1s = [], []
    for example in examples:
        if example.id not in predictions:
            exact_matches.append(0.0)
            f1s.append(0.0)
            continue
        example_language = _example_language(example, rules, language)
        prediction = predictions[example.id]
        golds = [answer.text for answer in example.answers]
        exact_matches.append(
            max(
                exact_match_score(prediction, g, rules=rules, language=example_language)
                for g in golds
            )
        )
        f1s.append(
            max(f1_score(prediction, g, rules=rules, language=example_language) for g in golds)
        )
    return exact_matches, f1s


def score(
    dataset: Sequence[QAExample],
    predictions: Mapping[str, str],
    *,
    rules: Rules = "squad",
    language: str | None = None,
) -> dict[str, float]:
    """Compute exact match and F1 of predictions over a data set.

    Args:
        dataset: Gold examples; each needs at least one answer.
        predictions: Predicted answer text per question id. Ids not in the data set are
            ignored; questions without a prediction score 0.
        rules: "squad" (SQuAD v1.1 rules) or "mlqa" (MLQA rules).
        language: Language for rules="mlqa". When None, each example's
            `metadata["language"]` is used.

    Returns:
        {"exact_match": ..., "f1": ...} in percent (0 for an empty data set).

    Raises:
        ValueError: If the rules or language are invalid, or a prediction is not a string.
    """
    _check_predictions(predictions)
    exact_matches, f1s = _score_examples(dataset, predictions, rules, language)

    num_missing = sum(1 for example in dataset if example.id not in predictions)
    if num_missing:
        logging.warning(
            "%d of %d questions have no prediction and score 0.", num_missing, len(dataset)
        )
    dataset_ids = {example.id for example in dataset}
    num_unknown = sum(1 for question_id in predictions if question_id not in dataset_ids)
    if num_unknown:
        logging.warning("Ignored %d predictions whose ids are not in the data set.", num_unknown)

    total = len(dataset)
    return {
        "exact_match": 100.0 * sum(exact_matches) / total if total else 0.0,
        "f1": 100.0 * sum(f1s) / total if total else 0.0,
    }


def score_squad(
    dataset_examples: Sequence[QAExample], predictions: Mapping[str, str]
) -> dict[str, float]:
    """Compute exact match and F1 with the official SQuAD v1.1 rules; see `score`."""
    return score(dataset_examples, predictions, rules="squad")


def _default_group_key(example: QAExample) -> Hashable:
    return example.metadata.get("gold_position")


def score_by(
    examples: Sequence[QAExample],
    predictions: Mapping[str, str],
    key: Callable[[QAExample], Hashable] = _default_group_key,
    *,
    rules: Rules = "squad",
    language: str | None = None,
) -> dict[Hashable, dict[str, float]]:
    """Compute exact match and F1 per group of examples.

    Args:
        examples: Gold examples.
        predictions: Predicted answer text per question id.
        key: Group of an example; by default its `metadata["gold_position"]` (None if unset).
        rules: "squad" or "mlqa", as in `score`.
        language: Language for rules="mlqa", as in `score`.

    Returns:
        Group -> {"exact_match", "f1" (percent), "count" (examples in the group)}, with groups
        sorted when their keys are comparable and in order of first appearance otherwise.

    Raises:
        ValueError: As `score`.
    """
    _check_predictions(predictions)
    exact_matches, f1s = _score_examples(examples, predictions, rules, language)
    grouped: dict[Hashable, list[int]] = {}
    for index, example in enumerate(examples):
        grouped.setdefault(key(example), []).append(index)
    try:
        groups = sorted(grouped)
    except TypeError:
        groups = list(grouped)
    return {
        group: {
            "exact_match": 100.0
            * sum(exact_matches[i] for i in grouped[group])
            / len(grouped[group]),
            "f1": 100.0 * sum(f1s[i] for i in grouped[group]) / len(grouped[group]),
            "count": len(grouped[group]),
        }
        for group in groups
    }


def aggregate_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Summarise the scores of several runs (for example seeds) per metric.

    The standard deviation is the sample standard deviation (divisor n - 1), as reported for
    "mean ± std over seeds". It is NaN for a single run.

    Args:
        runs: Score dicts with the same keys, such as the outputs of `score`.

    Returns:
        Metric -> {"mean": ..., "std": ..., "n": number of runs}.

    Raises:
        ValueError: If `runs` is empty or the runs do not have the same metrics.
    """
    if not runs:
        raise ValueError("aggregate_runs needs at least one run; got an empty list.")
    metrics = list(runs[0])
    for index, run in enumerate(runs):
        if set(run) != set(metrics):
            raise ValueError(
                f"Run {index} has metrics {sorted(run)}, but run 0 has {sorted(metrics)}. "
                "Aggregate only runs scored the same way."
            )
    summary = {}
    for metric in metrics:
        values = [float(run[metric]) for run in runs]
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "n": len(values),
        }
    return summary


def _format_value(value: float | Mapping[str, float], digits: int) -> str:
    if isinstance(value, Mapping):
        mean, std = value["mean"], value["std"]
        if math.isnan(std):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{value:.{digits}f}"


def format_markdown_table(
    results: Mapping[str, Mapping[str, float | Mapping[str, float]]],
    *,
    metrics: Sequence[str] = ("exact_match", "f1"),
    digits: int = 1,
    add_average: bool = True,
) -> str:
    """Format per-language results as a markdown table, one row per language.

    Args:
        results: Language -> metric -> value, where a value is a number (a `score` output) or
            a {"mean", "std", ...} dict (an `aggregate_runs` output, shown as "mean ± std").
        metrics: Metrics to show, one column each.
        digits: Digits after the decimal point.
        add_average: Whether to add a last row with the unweighted mean over languages (of the
            means, for aggregated values).

    Returns:
        The table as markdown text, ending in a newline.

    Raises:
        ValueError: If `results` is empty or a language lacks one of the metrics.
    """
    if not results:
        raise ValueError("format_markdown_table needs results for at least one language.")
    headers = {"exact_match": "EM", "f1": "F1"}
    lines = [
        "| language | " + " | ".join(headers.get(m, m) for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for language, values in results.items():
        missing = [m for m in metrics if m not in values]
        if missing:
            raise ValueError(
                f"Results for language {language!r} lack metrics {missing}; every language "
                f"needs {list(metrics)}."
            )
        cells = [_format_value(values[m], digits) for m in metrics]
        lines.append(f"| {language} | " + " | ".join(cells) + " |")
    if add_average:
        averages = []
        for metric in metrics:
            means = [
                v["mean"] if isinstance(v, Mapping) else v
                for v in (values[metric] for values in results.values())
            ]
            averages.append(f"{statistics.fmean(means):.{digits}f}")
        lines.append("| average | " + " | ".join(averages) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def _read_predictions(path: str) -> dict[str, str]:
    """Read a predictions file: a JSON object mapping question id to answer text."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ValueError(f"Predictions file not found: {path}.")
    try:
        predictions = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Predictions file {path} is not valid UTF-8 JSON: {exc}.") from exc
    if not isinstance(predictions, dict):
        raise ValueError(
            f"Predictions file {path} contains a JSON {type(predictions).__name__}; expected a "
            'JSON object mapping question id to answer text, e.g. {"56be4db0acb8001400a502ec": '
            '"Denver Broncos"}.'
        )
    try:
        _check_predictions(predictions)
    except ValueError as exc:
        raise ValueError(f"Predictions file {path}: {exc}") from exc
    return predictions


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longflax.evaluate",
        description=(
            "Score extractive QA predictions with the official SQuAD v1.1 or MLQA rules and "
            "print one JSON object with exact_match and f1 in percent."
        ),
    )
    parser.add_argument(
        "--data", required=True, help="Gold SQuAD-format JSON file (.json or .json.gz)."
    )
    parser.add_argument(
        "--predictions",
        required=True,
        action="append",
        help=(
            "JSON file mapping question id to predicted answer text. Repeat the option for "
            "several runs (for example seeds) to also get mean and sample std over them."
        ),
    )
    parser.add_argument(
        "--rules",
        choices=("squad", "mlqa"),
        default="squad",
        help="Normalisation rules: squad (SQuAD v1.1, default) or mlqa (needs --language).",
    )
    parser.add_argument(
        "--language",
        help=f"Language of the data for --rules mlqa; one of {', '.join(MLQA_LANGUAGES)}.",
    )
    parser.add_argument(
        "--by-gold-position",
        action="store_true",
        help="Also report scores per gold_position stored in the data's qa entries.",
    )
    return parser


def _evaluate_files(args: argparse.Namespace) -> dict[str, Any]:
    if args.rules == "mlqa":
        _check_language(args.language)
    # Scoring uses only the answer texts, so wrong answer_start offsets do not matter here.
    examples = load_squad(args.data, check_offsets=False)

    runs = []
    for path in args.predictions:
        predictions = _read_predictions(path)
        run: dict[str, Any] = {
            "predictions": path,
            **score(examples, predictions, rules=args.rules, language=args.language),
        }
        if args.by_gold_position:
            by_position = score_by(examples, predictions, rules=args.rules, language=args.language)
            run["by_gold_position"] = {str(k): v for k, v in by_position.items()}
        runs.append(run)

    if len(runs) == 1:
        result = {key: value for key, value in runs[0].items() if key != "predictions"}
    else:
        aggregate = aggregate_runs([{"exact_match": r["exact_match"], "f1": r["f1"]} for r in runs])
        result = {
            "exact_match": aggregate["exact_match"]["mean"],
            "f1": aggregate["f1"]["mean"],
            "aggregate": aggregate,
            "runs": runs,
        }
    result["num_questions"] = len(examples)
    result["rules"] = args.rules
    if args.language:
        result["language"] = args.language
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; see `python -m longflax.evaluate --help`.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status, 0 on success. Invalid input exits with status 2 and a message.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.rules == "mlqa" and args.language not in _MLQA_ARTICLES:
        parser.error(
            f"--rules mlqa needs --language set to one of {', '.join(MLQA_LANGUAGES)} "
            f"(got {args.language}); for other languages use --rules squad."
        )
    try:
        result = _evaluate_files(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
