"""Tokenised extractive-QA features: question/context windows with offsets, labels and masks.

Each example becomes one or more fixed-length rows laid out by the tokenizer's pair template,
for example `<s> question </s></s> context </s> <pad>...` for RoBERTa and XLM-R or
`[CLS] question [SEP] context [SEP] [PAD]...` for BERT. Questions and contexts are tokenised
separately in batched fast-tokenizer calls (each distinct context once), and the rows are then
assembled with numpy. The rows hold the same tokens as the fast tokenizer's own pair encoding.
Because the question/context boundary of every row is known here, the global attention mask
never depends on counting separator ids, and a context may contain any text.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

if TYPE_CHECKING:
    import tokenizers
    from transformers import PreTrainedTokenizerBase

    from longflax.data.squad import QAExample

__all__ = ["QAFeatures", "iterate_batches", "prepare_qa_features"]

# Number of example ids shown in log lines about skipped or unusual examples.
_IDS_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class QAFeatures:
    """Model inputs for extractive QA, one row per context window.

    N is the number of features (windows) and L the padded row length.

    Attributes:
        input_ids: (N, L) int32 token ids, padded with `pad_token_id`.
        attention_mask: (N, L) int32, 1 on real tokens and 0 on padding.
        token_type_ids: (N, L) int32 segment ids from the tokenizer's pair template (all 0
            for RoBERTa and XLM-R, 1 on the context and its final separator for BERT).
        global_attention_mask: (N, L) int32, 1 on the tokens before the question (the first
            token) and on the question tokens, 0 elsewhere.
        offset_mapping: (N, L, 2) int32 character spans `[start, end)` of the context tokens
            in the example's context, and (-1, -1) on question, special and padding tokens.
        example_index: (N,) int32 index of the example each feature comes from.
        window_start: (N,) int32 index, within the whole tokenised context, of the window's
            first context token.
        start_positions: (N,) int32 row index of the answer's first token, or 0 (the first
            token) when the answer is not wholly inside the window. None unless built with
            `training=True`.
        end_positions: (N,) int32 row index of the answer's last token, as `start_positions`.
        example_ids: Id of every example, in input order.
        windows_per_example: (num_examples,) int32 number of features built per example.
        num_truncated_questions: Questions cut to `max_question_tokens` tokens.
        num_truncated_contexts: Contexts that did not fit in their single window when
            `doc_stride=0`. The model never sees their tail.
        num_answers_not_found: Training examples whose first answer matches no context token,
            or whose `answer.start` does not point at the answer text. Their features are
            labelled 0.
        pad_token_id: The tokenizer's padding id.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    global_attention_mask: np.ndarray
    offset_mapping: np.ndarray
    example_index: np.ndarray
    window_start: np.ndarray
    start_positions: np.ndarray | None
    end_positions: np.ndarray | None
    example_ids: tuple[str, ...]
    windows_per_example: np.ndarray
    num_truncated_questions: int
    num_truncated_contexts: int
    num_answers_not_found: int
    pad_token_id: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_length(self) -> int:
        """Padded row length L."""
        return int(self.input_ids.shape[1])


@dataclasses.dataclass(frozen=True)
class _PairTemplate:
    """Special tokens and segment ids the tokenizer puts around a (question, context) pair."""

    prefix_ids: tuple[int, ...]
    prefix_types: tuple[int, ...]
    question_type: int
    middle_ids: tuple[int, ...]
    middle_types: tuple[int, ...]
    context_type: int
    suffix_ids: tuple[int, ...]
    suffix_types: tuple[int, ...]

    @property
    def num_special_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.middle_ids) + len(self.suffix_ids)


@dataclasses.dataclass(frozen=True)
class _Windows:
    """Per-feature window layout."""

    example_index: np.ndarray  # (N,) example of each feature
    start: np.ndarray  # (N,) first context token of the window, in the whole context
    length: np.ndarray  # (N,) number of context tokens in the window
    context_column: np.ndarray  # (N,) row column of the window's first context token
    row_length: np.ndarray  # (N,) number of real tokens in the row
    per_example: np.ndarray  # (num_examples,) number of windows
    num_truncated_contexts: int


def prepare_qa_features(
    examples: Sequence[QAExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    doc_stride: int,
    max_question_tokens: int,
    training: bool,
    pad_to_multiple_of: int | None = None,
) -> QAFeatures:
    """Tokenise QA examples into fixed-length question/context windows.

    A context longer than one window is split into several windows, each repeating the
    question. `doc_stride` is the number of context tokens shared by consecutive windows (the
    overlap, as `stride` in Hugging Face tokenizers), not the step between window starts. With
    window capacity C, windows start at context tokens 0, C - doc_stride, 2 * (C - doc_stride)
    and so on, and the last window contains the remaining tokens. `doc_stride=0` keeps only the first
    window and truncates longer contexts (`num_truncated_contexts` counts them), the setting
    of long-context QA fine-tuning runs that train on one window per question.

    The capacity C of a row is `max_length` minus the question tokens and the special tokens,
    so it varies with the question length.

    Args:
        examples: Objects with the fields of `longflax.data.squad.QAExample`: `id`,
            `context`, `question` and `answers` (each with `text` and character `start`).
        tokenizer: A Hugging Face fast tokenizer (BERT WordPiece, RoBERTa byte-level BPE,
            XLM-R SentencePiece or any other with a pair template and a padding token).
        max_length: Row length in tokens, special tokens included.
        doc_stride: Overlap in context tokens between consecutive windows, or 0 to keep only
            the first window.
        max_question_tokens: Questions longer than this many tokens are cut to it.
        training: Whether to compute `start_positions` and `end_positions` from the first
            answer of each example.
        pad_to_multiple_of: None pads every row to `max_length`. An integer pads every row to
            the longest row rounded up to a multiple of it, which must then divide
            `max_length` (for example the Longformer attention window). This saves memory
            for short contexts: padding all 87,599 SQuAD train rows to 4096 tokens takes about
            8.6 GB (24 bytes per position), while their longest row fits in 1024.

    Returns:
        The features, with statistics about truncation and unmatched answers.

    Raises:
        ValueError: If an argument is out of range, the tokenizer is not a fast tokenizer or
            has no padding token, `examples` is empty, or a training example has no answer.
    """
    _validate_lengths(max_length, doc_stride, max_question_tokens, pad_to_multiple_of)
    if not examples:
        raise ValueError("examples is empty, but prepare_qa_features needs at least one example.")
    backend = _backend_tokenizer(tokenizer)
    template = _pair_template(backend)
    min_capacity = max_length - template.num_special_tokens - max_question_tokens
    if min_capacity < 1:
        raise ValueError(
            f"max_length={max_length} leaves no room for the context after "
            f"max_question_tokens={max_question_tokens} question tokens and "
            f"{template.num_special_tokens} special tokens. Increase max_length or reduce "
            "max_question_tokens."
        )
    if doc_stride >= min_capacity:
        raise ValueError(
            f"doc_stride={doc_stride} must be smaller than the context capacity of a window, "
            f"{min_capacity} tokens (max_length={max_length} minus max_question_tokens="
            f"{max_question_tokens} minus {template.num_special_tokens} special tokens). "
            "doc_stride is the overlap between consecutive windows, so reduce it or increase "
            "max_length."
        )
    if training:
        _check_answers_present(examples)

    began = time.perf_counter()

    # Tokenise every distinct context once: SQuAD has about 4.6 questions per paragraph.
    context_ids_of: dict[str, int] = {}
    context_index = np.fromiter(
        (context_ids_of.setdefault(ex.context, len(context_ids_of)) for ex in examples),
        dtype=np.int64,
        count=len(examples),
    )
    contexts = _tokenize(backend, list(context_ids_of), with_offsets=True)
    questions = _tokenize(backend, [ex.question for ex in examples], with_offsets=False)

    question_length = np.minimum(questions.lengths, max_question_tokens)
    truncated_questions = np.flatnonzero(questions.lengths > max_question_tokens)
    windows = _plan_windows(
        template,
        question_length=question_length,
        context_length=contexts.lengths[context_index],
        max_length=max_length,
        doc_stride=doc_stride,
    )

    row_length = max_length
    if pad_to_multiple_of is not None:
        longest = int(windows.row_length.max())
        row_length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of

    arrays = _assemble_rows(
        template,
        windows,
        questions=questions,
        question_length=question_length,
        contexts=contexts,
        context_index=context_index,
        row_length=row_length,
        pad_token_id=tokenizer.pad_token_id,
    )

    start_positions = end_positions = None
    not_found: list[str] = []
    if training:
        token_start, token_end, found = _answer_token_spans(examples, contexts, context_index)
        not_found = [examples[i].id for i in np.flatnonzero(~found)]
        start_positions, end_positions = _window_labels(windows, token_start, token_end, found)

    features = QAFeatures(
        **arrays,
        example_index=windows.example_index.astype(np.int32),
        window_start=windows.start.astype(np.int32),
        start_positions=start_positions,
        end_positions=end_positions,
        example_ids=tuple(ex.id for ex in examples),
        windows_per_example=windows.per_example.astype(np.int32),
        num_truncated_questions=int(truncated_questions.size),
        num_truncated_contexts=windows.num_truncated_contexts,
        num_answers_not_found=len(not_found),
        pad_token_id=int(tokenizer.pad_token_id),
    )
    _log_summary(
        features,
        seconds=time.perf_counter() - began,
        truncated_question_ids=[examples[i].id for i in truncated_questions[:_IDS_SHOWN]],
        not_found_ids=not_found[:_IDS_SHOWN],
        max_question_tokens=max_question_tokens,
    )
    return features


def iterate_batches(
    features: QAFeatures,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield fixed-shape numpy batches that together contain every feature exactly once.

    The last batch is filled up to `batch_size` with copies of its first feature, so that
    every row is a well-formed input. On those rows `valid` is False and `feature_index` is -1.
    Losses and metrics must weight rows by `valid`.

    Args:
        features: The features to batch.
        batch_size: Rows per batch.
        shuffle: Whether to visit the features in a random order.
        seed: Seed of that order.

    Yields:
        Dicts with `input_ids`, `attention_mask`, `token_type_ids`, `global_attention_mask`
        (each (batch_size, L) int32), `start_positions` and `end_positions` (when the features
        have labels, (batch_size,) int32), `feature_index` ((batch_size,) int32) and `valid`
        ((batch_size,) bool).

    Raises:
        ValueError: If `batch_size` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of rows, got {batch_size}.")
    order = np.arange(len(features))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(features))

    names = ["input_ids", "attention_mask", "token_type_ids", "global_attention_mask"]
    if features.start_positions is not None:
        names += ["start_positions", "end_positions"]

    for begin in range(0, len(order), batch_size):
        indices = order[begin : begin + batch_size]
        num_real = indices.size
        padded = np.concatenate([indices, np.full(batch_size - num_real, indices[0])])
        batch = {name: getattr(features, name)[padded] for name in names}
        batch["feature_index"] = np.where(np.arange(batch_size) < num_real, padded, -1).astype(
            np.int32
        )
        batch["valid"] = np.arange(batch_size) < num_real
        yield batch


# --------------------------------------------------------------------------------------------
# Checks


def _validate_lengths(
    max_length: int, doc_stride: int, max_question_tokens: int, pad_to_multiple_of: int | None
) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}.")
    if doc_stride < 0:
        raise ValueError(
            f"doc_stride must be 0 (keep only the first window) or a positive overlap in "
            f"tokens, got {doc_stride}."
        )
    if max_question_tokens < 1:
        raise ValueError(
            f"max_question_tokens must be a positive number of tokens, got {max_question_tokens}."
        )
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive number of tokens or None, got "
                f"{pad_to_multiple_of}."
            )
        if max_length % pad_to_multiple_of:
            raise ValueError(
                f"max_length={max_length} is not a multiple of pad_to_multiple_of="
                f"{pad_to_multiple_of}, so a padded row could exceed max_length. Choose a "
                "max_length that pad_to_multiple_of divides."
            )


def _check_answers_present(examples: Sequence[QAExample]) -> None:
    missing = [ex.id for ex in examples if not ex.answers]
    if missing:
        raise ValueError(
            f"{len(missing)} training examples have no answer (first ids: "
            f"{missing[:_IDS_SHOWN]}). Training features need at least one answer per "
            "example, so drop unanswerable questions first."
        )


def _backend_tokenizer(tokenizer: PreTrainedTokenizerBase) -> tokenizers.Tokenizer:
    """Return the Rust tokenizer behind `tokenizer`, with truncation and padding off."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no backend_tokenizer, but QA features need "
            "character offsets from a Hugging Face fast tokenizer. Load one with "
            "AutoTokenizer.from_pretrained(...), or wrap a tokenizers.Tokenizer with "
            "PreTrainedTokenizerFast(tokenizer_object=...)."
        )
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no padding token. Set tokenizer.pad_token "
            "before building QA features."
        )
    if backend.truncation is not None or backend.padding is not None:
        # Work on a copy so that the caller's tokenizer keeps its settings.
        import tokenizers

        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return backend


def _pair_template(backend: tokenizers.Tokenizer) -> _PairTemplate:
    """Read the special tokens and segment ids of the tokenizer's pair template."""
    pair = backend.encode("a", "b", add_special_tokens=True)

    sequence_ids = pair.sequence_ids
    question_columns = [i for i, s in enumerate(sequence_ids) if s == 0]
    context_columns = [i for i, s in enumerate(sequence_ids) if s == 1]
    if not question_columns or not context_columns:
        raise ValueError(
            "the tokenizer returned no token for the text 'a' or 'b' of a probe pair, so the "
            "layout of its (question, context) pairs cannot be read. Use a tokenizer that maps "
            "unknown characters to an unknown token instead of dropping them."
        )
    q_first, q_last = question_columns[0], question_columns[-1]
    c_first, c_last = context_columns[0], context_columns[-1]

    ids, types = pair.ids, pair.type_ids
    return _PairTemplate(
        prefix_ids=tuple(ids[:q_first]),
        prefix_types=tuple(types[:q_first]),
        question_type=types[q_first],
        middle_ids=tuple(ids[q_last + 1 : c_first]),
        middle_types=tuple(types[q_last + 1 : c_first]),
        context_type=types[c_first],
        suffix_ids=tuple(ids[c_last + 1 :]),
        suffix_types=tuple(types[c_last + 1 :]),
    )


# --------------------------------------------------------------------------------------------
# Tokenisation and layout


@dataclasses.dataclass(frozen=True)
class _Tokenized:
    """Token ids (and character offsets) of many texts, concatenated."""

    ids: np.ndarray  # (T,) int32
    offsets: np.ndarray | None  # (T, 2) int32
    lengths: np.ndarray  # (num_texts,) tokens per text
    first: np.ndarray  # (num_texts,) index in `ids` of each text's first token


def _tokenize(backend: tokenizers.Tokenizer, texts: list[str], *, with_offsets: bool) -> _Tokenized:
    """Encode `texts` without special tokens and concatenate their ids (and offsets)."""
    # encode_batch_fast skips offsets but took more CPU time than encode_batch with tokenizers
    # 0.23.3 (6.0-6.8 s against 4.5-4.8 s for the 87,599 SQuAD train questions, RoBERTa, one
    # thread, 2-core CPU), so both paths use encode_batch.
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(
        itertools.chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total
    )
    offsets = None
    if with_offsets:
        flat = itertools.chain.from_iterable(
            itertools.chain.from_iterable(e.offsets) for e in encodings
        )
        offsets = np.fromiter(flat, dtype=np.int32, count=2 * total).reshape(total, 2)
    first = np.cumsum(lengths) - lengths
    return _Tokenized(ids=ids, offsets=offsets, lengths=lengths, first=first)


def _plan_windows(
    template: _PairTemplate,
    *,
    question_length: np.ndarray,
    context_length: np.ndarray,
    max_length: int,
    doc_stride: int,
) -> _Windows:
    """Place the context windows of every example."""
    capacity = max_length - template.num_special_tokens - question_length
    if doc_stride == 0:
        per_example = np.ones_like(context_length)
        num_truncated = int(np.count_nonzero(context_length > capacity))
    else:
        step = capacity - doc_stride
        extra = np.maximum(context_length - capacity, 0)
        per_example = 1 + (extra + step - 1) // step
        num_truncated = 0

    example_index = np.repeat(np.arange(context_length.size), per_example)
    # Position of each feature among its example's windows: 0, 1, 2, ...
    window_number = np.arange(example_index.size) - np.repeat(
        np.cumsum(per_example) - per_example, per_example
    )
    step_of_feature = (capacity - doc_stride)[example_index]
    start = window_number * step_of_feature
    length = np.minimum(capacity[example_index], context_length[example_index] - start)
    context_column = (
        len(template.prefix_ids) + question_length[example_index] + len(template.middle_ids)
    )
    return _Windows(
        example_index=example_index,
        start=start,
        length=length,
        context_column=context_column,
        row_length=context_column + length + len(template.suffix_ids),
        per_example=per_example,
        num_truncated_contexts=num_truncated,
    )


def _segment_positions(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return, for segments of the given lengths laid end to end, each element's segment and
    its position inside that segment."""
    segment = np.repeat(np.arange(lengths.size), lengths)
    within = np.arange(segment.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return segment, within


def _copy_indices(
    lengths: np.ndarray, *, target_first: np.ndarray, source_first: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return flat target and source indices that copy segment i, of `lengths[i]` elements,
    from `source_first[i]` onwards to `target_first[i]` onwards."""
    segment_begin = np.cumsum(lengths) - lengths
    element = np.arange(int(lengths.sum()))
    target = element + np.repeat(target_first - segment_begin, lengths)
    source = element + np.repeat(source_first - segment_begin, lengths)
    return target, source


def _assemble_rows(
    template: _PairTemplate,
    windows: _Windows,
    *,
    questions: _Tokenized,
    question_length: np.ndarray,
    contexts: _Tokenized,
    context_index: np.ndarray,
    row_length: int,
    pad_token_id: int,
) -> dict[str, Any]:
    """Write prefix, question, middle, context window and suffix of every row."""
    num_rows = windows.example_index.size
    input_ids = np.full((num_rows, row_length), pad_token_id, dtype=np.int32)
    token_type_ids = np.zeros((num_rows, row_length), dtype=np.int32)
    offset_mapping = np.full((num_rows, row_length, 2), -1, dtype=np.int32)
    rows = np.arange(num_rows)

    for column, (token, segment) in enumerate(
        zip(template.prefix_ids, template.prefix_types, strict=True)
    ):
        input_ids[:, column] = token
        token_type_ids[:, column] = segment

    # Question tokens, copied from the concatenated question ids.
    example_question_length = question_length[windows.example_index]
    target, source = _copy_indices(
        example_question_length,
        target_first=rows * row_length + len(template.prefix_ids),
        source_first=questions.first[windows.example_index],
    )
    input_ids.reshape(-1)[target] = questions.ids[source]
    token_type_ids.reshape(-1)[target] = template.question_type

    middle_column = len(template.prefix_ids) + example_question_length
    for offset, (token, segment) in enumerate(
        zip(template.middle_ids, template.middle_types, strict=True)
    ):
        input_ids[rows, middle_column + offset] = token
        token_type_ids[rows, middle_column + offset] = segment

    # Context window tokens, copied from the concatenated context ids.
    target, source = _copy_indices(
        windows.length,
        target_first=rows * row_length + windows.context_column,
        source_first=contexts.first[context_index[windows.example_index]] + windows.start,
    )
    input_ids.reshape(-1)[target] = contexts.ids[source]
    token_type_ids.reshape(-1)[target] = template.context_type
    offset_mapping.reshape(-1, 2)[target] = contexts.offsets[source]

    suffix_column = windows.context_column + windows.length
    for offset, (token, segment) in enumerate(
        zip(template.suffix_ids, template.suffix_types, strict=True)
    ):
        input_ids[rows, suffix_column + offset] = token
        token_type_ids[rows, suffix_column + offset] = segment

    positions = np.arange(row_length)
    attention_mask = (positions < windows.row_length[:, None]).astype(np.int32)
    global_attention_mask = (positions < middle_column[:, None]).astype(np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "global_attention_mask": global_attention_mask,
        "offset_mapping": offset_mapping,
    }


# --------------------------------------------------------------------------------------------
# Labels


def _answer_token_spans(
    examples: Sequence[QAExample], contexts: _Tokenized, context_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map each example's first answer to context token indices.

    The answer's first token is the first context token that covers a character at or after
    `answer.start`. Its last token is the last context token that covers a character before
    the answer's end. Tokens that cover no character, such as the byte-level "Ġ" of a repeated
    space, never start or end an answer.

    Returns:
        First token, last token and a found flag per example. Indices count from the start
        of the example's whole tokenised context.
    """
    char_start = np.fromiter((ex.answers[0].start for ex in examples), dtype=np.int64)
    char_end = char_start + np.fromiter((len(ex.answers[0].text) for ex in examples), np.int64)
    aligned = np.fromiter(
        (
            ex.context[ex.answers[0].start : ex.answers[0].start + len(ex.answers[0].text)]
            == ex.answers[0].text
            and ex.answers[0].start >= 0
            for ex in examples
        ),
        dtype=bool,
        count=len(examples),
    )

    # One flat entry per (example, token of its context), so that the search is vectorised.
    lengths = contexts.lengths[context_index]
    example, within = _segment_positions(lengths)
    token = contexts.first[context_index][example] + within
    token_start, token_end = contexts.offsets[token, 0], contexts.offsets[token, 1]
    covers_text = token_end > token_start

    never = np.iinfo(np.int64).max
    starts_answer = covers_text & (token_end > char_start[example])
    first = np.full(len(examples), never)
    np.minimum.at(first, example, np.where(starts_answer, within, never))

    ends_answer = covers_text & (token_start < char_end[example])
    last = np.full(len(examples), -1)
    np.maximum.at(last, example, np.where(ends_answer, within, -1))

    found = aligned & (first != never) & (last >= 0) & (first <= last)
    return np.where(found, first, 0), np.where(found, last, 0), found


def _window_labels(
    windows: _Windows, token_start: np.ndarray, token_end: np.ndarray, found: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Turn context token indices into row indices, or 0 where the answer is not in the window."""
    example = windows.example_index
    inside = (
        found[example]
        & (token_start[example] >= windows.start)
        & (token_end[example] < windows.start + windows.length)
    )
    shift = windows.context_column - windows.start
    start_positions = np.where(inside, token_start[example] + shift, 0)
    end_positions = np.where(inside, token_end[example] + shift, 0)
    return start_positions.astype(np.int32), end_positions.astype(np.int32)


def _log_summary(
    features: QAFeatures,
    *,
    seconds: float,
    truncated_question_ids: list[str],
    not_found_ids: list[str],
    max_question_tokens: int,
) -> None:
    windows = features.windows_per_example
    logging.info(
        "Built %d QA features of length %d from %d examples in %.1f s (windows per example: "
        "mean %.2f, max %d).",
        len(features),
        features.seq_length,
        windows.size,
        seconds,
        float(windows.mean()),
        int(windows.max()),
    )
    if features.num_truncated_questions:
        logging.info(
            "Cut %d questions to max_question_tokens=%d (first ids: %s).",
            features.num_truncated_questions,
            max_question_tokens,
            truncated_question_ids,
        )
    if features.num_truncated_contexts:
        logging.info(
            "doc_stride=0: kept only the first window of %d contexts that are longer.",
            features.num_truncated_contexts,
        )
    if features.num_answers_not_found:
        logging.warning(
            "%d training answers match no context token or do not occur at answer.start, so "
            "their features are labelled 0 (first ids: %s).",
            features.num_answers_not_found,
            not_found_ids,
        )
