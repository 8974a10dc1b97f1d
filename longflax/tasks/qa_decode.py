"""Turn start/end logits of extractive-QA features into answer strings.

Two decoding rules are offered:

* "context_span" (the default, the usual SQuAD post-processing): an answer is a span of
  context tokens from all windows of the example, with end >= start and at most
  `max_answer_length` tokens, scored by start logit + end logit. Question, special and
  padding positions, tokens that cover no character, and logit positions beyond the feature
  length are never chosen. The answer is the raw context substring between the span's
  character offsets. Candidates from overlapping windows with the same characters are merged.
* "independent_argmax" reproduces an older evaluation, kept for comparison with published
  numbers. Per window, start = argmax of the start logits and end = argmax of the end logits
  over the whole row, padding included, with no further check. The example takes the window
  with the largest start + end logit. Its answer is the context text between the two tokens'
  offsets, or "" when either is not a context token or the end comes before the start.
  NOTE: the older evaluation decoded the selected token ids instead, so where its argmax fell
  on question or special tokens it returned that text and the two can score differently.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from absl import logging

if TYPE_CHECKING:
    from longflax.data.qa_features import QAFeatures
    from longflax.data.squad import QAExample

__all__ = ["decode_predictions", "write_predictions"]

DecodeRule = Literal["context_span", "independent_argmax"]
_RULES = ("context_span", "independent_argmax")


def decode_predictions(
    examples: Sequence[QAExample],
    features: QAFeatures,
    start_logits: Any,
    end_logits: Any,
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    rule: DecodeRule = "context_span",
) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """Pick an answer string for every example from the logits of its features.

    Args:
        examples: The examples the features were built from, in the same order.
        features: Output of `prepare_qa_features` for `examples`.
        start_logits: (N, L') array of start logits, one row per feature. L' may exceed the
            feature length L (padding added by the model), and positions from L on are ignored.
        end_logits: (N, L') array of end logits.
        n_best_size: "context_span": start and end candidates kept per window, and the
            length of each n-best list.
        max_answer_length: "context_span": maximum answer length in tokens.
        rule: "context_span" or "independent_argmax" (see the module docstring).

    Returns:
        `predictions`, the answer text per example id, and `nbest`, per example id a list of
        candidates, best first. Each candidate is a dict with `text`, `score` (start logit +
        end logit), `probability` (softmax of the scores over the list), `start_logit`,
        `end_logit`, `feature_index`, `start_index` and `end_index` (row positions) and
        `char_start` / `char_end` (the span in the context, -1 when the span has no
        context characters). The n-best list of an example whose windows hold no context
        token is empty and its prediction is "".

    Raises:
        ValueError: If the rule or a size is invalid, the examples do not match the features,
            or the logits do not have one row of at least L positions per feature.
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}.")
    if n_best_size < 1:
        raise ValueError(f"n_best_size must be a positive number of candidates, got {n_best_size}.")
    if max_answer_length < 1:
        raise ValueError(
            f"max_answer_length must be a positive number of tokens, got {max_answer_length}."
        )
    _check_examples_match(examples, features)
    start_logits = _check_logits("start_logits", start_logits, features)
    end_logits = _check_logits("end_logits", end_logits, features)

    if rule == "context_span":
        candidates = _context_span_candidates(
            features, start_logits, end_logits, n_best_size, max_answer_length
        )
    else:
        candidates = _independent_argmax_candidates(features, start_logits, end_logits)

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for example_number, example in enumerate(examples):
        entries = _nbest_entries(example, candidates[example_number], n_best_size)
        predictions[example.id] = entries[0]["text"] if entries else ""
        nbest[example.id] = entries

    empty = [example_id for example_id, entries in nbest.items() if not entries]
    if empty:
        logging.warning(
            "%d examples have no candidate answer span, so their prediction is '' (first ids: %s).",
            len(empty),
            empty[:5],
        )
    return predictions, nbest


def write_predictions(
    directory: str | os.PathLike[str],
    predictions: Mapping[str, str],
    nbest: Mapping[str, list[dict[str, Any]]],
) -> tuple[pathlib.Path, pathlib.Path]:
    """Write `predictions.json` ({id: answer}) and `nbest_predictions.json` into `directory`.

    The directory is created if needed. Both files are UTF-8 JSON with non-ASCII characters
    written as they are, the format the official SQuAD evaluation scripts read.

    Returns:
        The paths of the two files.

    Raises:
        ValueError: If `predictions` and `nbest` do not have the same example ids.
    """
    if set(predictions) != set(nbest):
        only_predictions = sorted(set(predictions) - set(nbest))[:5]
        only_nbest = sorted(set(nbest) - set(predictions))[:5]
        raise ValueError(
            "predictions and nbest must have the same example ids, but ids only in "
            f"predictions are {only_predictions} and ids only in nbest are {only_nbest}. Pass "
            "both outputs of one decode_predictions call."
        )
    folder = pathlib.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    predictions_path = folder / "predictions.json"
    nbest_path = folder / "nbest_predictions.json"
    predictions_path.write_text(
        json.dumps(dict(predictions), ensure_ascii=False, indent=2), encoding="utf-8"
    )
    nbest_path.write_text(json.dumps(dict(nbest), ensure_ascii=False, indent=2), encoding="utf-8")
    logging.info("Wrote %d predictions to %s.", len(predictions), folder)
    return predictions_path, nbest_path


# --------------------------------------------------------------------------------------------
# Checks


def _check_examples_match(examples: Sequence[QAExample], features: QAFeatures) -> None:
    ids = tuple(example.id for example in examples)
    if ids != features.example_ids:
        raise ValueError(
            f"the {len(ids)} examples do not match the {len(features.example_ids)} examples "
            "the features were built from (ids or order differ). Pass the same example list "
            "to prepare_qa_features and decode_predictions."
        )


def _check_logits(name: str, logits: Any, features: QAFeatures) -> np.ndarray:
    array = np.asarray(logits, dtype=np.float32)
    num_features, length = features.input_ids.shape
    if array.ndim != 2 or array.shape[0] != num_features or array.shape[1] < length:
        raise ValueError(
            f"{name} must have shape (num_features, at least seq_length) = ({num_features}, "
            f">= {length}), got {array.shape}. Pass the logits of every feature, in feature "
            "order, for the whole padded row."
        )
    return array


# --------------------------------------------------------------------------------------------
# Candidate spans

# Columns of a candidate row. Candidates are kept in float64 arrays, which represent the integer
# columns exactly.
_SCORE, _START_LOGIT, _END_LOGIT, _FEATURE, _START, _END, _CHAR_START, _CHAR_END = range(8)


def _context_span_candidates(
    features: QAFeatures,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int,
    max_answer_length: int,
) -> list[np.ndarray]:
    """Return per example the candidate rows of every valid span of context tokens."""
    length = features.seq_length
    # Positions past `length` exist only in the logits and are dropped here.
    is_context = _covers_context(features.offset_mapping)
    start = np.where(is_context, start_logits[:, :length], -np.inf)
    end = np.where(is_context, end_logits[:, :length], -np.inf)

    k = min(n_best_size, length)
    top_start = np.argpartition(-start, k - 1, axis=1)[:, :k]  # (N, k), unordered
    top_end = np.argpartition(-end, k - 1, axis=1)[:, :k]
    start_score = np.take_along_axis(start, top_start, axis=1)
    end_score = np.take_along_axis(end, top_end, axis=1)

    # Every (start, end) pair of the top candidates of a window: shapes (N, k, k).
    span_start = top_start[:, :, None]
    span_end = top_end[:, None, :]
    valid = (
        np.isfinite(start_score[:, :, None] + end_score[:, None, :])
        & (span_end >= span_start)
        & (span_end - span_start + 1 <= max_answer_length)
    )
    feature, i, j = np.nonzero(valid)
    return _candidate_rows(
        features,
        feature=feature,
        start=top_start[feature, i],
        end=top_end[feature, j],
        start_logit=start_score[feature, i],
        end_logit=end_score[feature, j],
    )


def _independent_argmax_candidates(
    features: QAFeatures, start_logits: np.ndarray, end_logits: np.ndarray
) -> list[np.ndarray]:
    """Return per example one candidate row: its window with the largest start + end logit."""
    feature = np.arange(len(features))
    start = np.argmax(start_logits, axis=1)
    end = np.argmax(end_logits, axis=1)
    grouped = _candidate_rows(
        features,
        feature=feature,
        start=start,
        end=end,
        start_logit=start_logits[feature, start],
        end_logit=end_logits[feature, end],
    )
    return [group[np.argmax(group[:, _SCORE])][None, :] for group in grouped]


def _covers_context(offsets: np.ndarray) -> np.ndarray:
    """Mark context tokens that cover at least one character of the context."""
    return (offsets[..., 0] >= 0) & (offsets[..., 1] > offsets[..., 0])


def _candidate_rows(
    features: QAFeatures,
    *,
    feature: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    start_logit: np.ndarray,
    end_logit: np.ndarray,
) -> list[np.ndarray]:
    """Build candidate rows, with the span's characters, and split them by example.

    A span whose start or end is not a context token, lies past the feature length, or ends
    before it starts has no characters: `char_start` and `char_end` are -1.
    """
    length = features.seq_length
    inside = (start < length) & (end < length)
    safe_start = np.where(inside, start, 0)
    safe_end = np.where(inside, end, 0)
    offsets = features.offset_mapping
    has_text = (
        inside
        & _covers_context(offsets[feature, safe_start])
        & _covers_context(offsets[feature, safe_end])
        & (end >= start)
    )
    char_start = np.where(has_text, offsets[feature, safe_start, 0], -1)
    char_end = np.where(has_text, offsets[feature, safe_end, 1], -1)

    rows = np.stack(
        [
            start_logit + end_logit,
            start_logit,
            end_logit,
            feature,
            start,
            end,
            char_start,
            char_end,
        ],
        axis=1,
    ).astype(np.float64)

    example = features.example_index[feature]
    order = np.argsort(example, kind="stable")
    counts = np.bincount(example, minlength=len(features.example_ids))
    return np.split(rows[order], np.cumsum(counts)[:-1])


def _nbest_entries(
    example: QAExample, candidates: np.ndarray, n_best_size: int
) -> list[dict[str, Any]]:
    """Build the n-best list of one example, best first, keeping one entry per character
    span (overlapping windows propose the same span more than once)."""
    entries: list[dict[str, Any]] = []
    seen_spans: set[tuple[int, int]] = set()
    for row in candidates[np.argsort(-candidates[:, _SCORE], kind="stable")]:
        char_start, char_end = int(row[_CHAR_START]), int(row[_CHAR_END])
        if (char_start, char_end) in seen_spans:
            continue
        seen_spans.add((char_start, char_end))
        entries.append(
            {
                "text": example.context[char_start:char_end] if char_start >= 0 else "",
                "score": float(row[_SCORE]),
                "start_logit": float(row[_START_LOGIT]),
                "end_logit": float(row[_END_LOGIT]),
                "feature_index": int(row[_FEATURE]),
                "start_index": int(row[_START]),
                "end_index": int(row[_END]),
                "char_start": char_start,
                "char_end": char_end,
            }
        )
        if len(entries) == n_best_size:
            break

    if entries:
        scores = np.array([entry["score"] for entry in entries])
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        for entry, probability in zip(entries, probabilities, strict=True):
            entry["probability"] = float(probability)
    return entries
