"""Long-context QA sets built by joining k contexts per example, in SQuAD format.

Two constructions:

* `original` reproduces the earlier published SQ3/XQ3 sets exactly. A row (one question) is
  kept only if its context differs from the previous row's, which keeps the first question of
  each paragraph because SQuAD rows are grouped by paragraph. The kept rows form consecutive
  groups of k in data-set order (the last group is shorter when the count is not a multiple
  of k). Each kept row becomes one example whose context is its group's contexts joined with
  no separator, with `answer_start` moved by the length of the contexts before its own. On the
  SQuAD v1.1 dev set this gives 2,067 examples from 10,570 questions.
* `shuffled` (the default) keeps every question. Paragraphs are deduplicated by their text.
  Each question gets k - 1 distractor contexts, drawn with a seeded `random.Random` from other
  articles when there are enough of them. The gold context is placed at a chosen position, and
  the contexts are joined with a separator (default a blank line).

Both record `gold_position` (0-based index of the example's own context) and `num_contexts` in
each example's metadata, so that scores can be broken down by position.

Command line:

    python -m longflax.data.concat --input dev-v1.1.json --output dev-sq3.json --k 3
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
from collections.abc import Sequence
from typing import Literal

from absl import logging

from longflax.data.squad import (
    Answer,
    QAExample,
    find_misaligned_answers,
    load_squad_with_report,
    save_squad,
)

__all__ = [
    "GOLD_POSITIONS",
    "MODES",
    "build_concatenated",
    "concatenate_original",
    "concatenate_shuffled",
    "main",
]

MODES = ("original", "shuffled")
GOLD_POSITIONS = ("first", "middle", "last", "random")
DEFAULT_SEPARATOR = "\n\n"


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k (contexts per example) must be a positive integer, got {k!r}.")


def _check_input_alignment(examples: Sequence[QAExample]) -> None:
    misaligned = find_misaligned_answers(examples)
    if misaligned:
        ids = sorted({example_id for example_id, _ in misaligned})
        raise ValueError(
            f"{len(misaligned)} input answers do not match their answer_start (first ids: "
            f"{ids[:5]}). Load the input with on_invalid='skip' to drop these questions."
        )


def _check_output_alignment(examples: Sequence[QAExample]) -> None:
    """Raise if any built example has an answer whose offset does not point at its text."""
    misaligned = find_misaligned_answers(examples)
    if misaligned:
        example_id, answer = misaligned[0]
        raise RuntimeError(
            f"Concatenation produced {len(misaligned)} misaligned answers, the first in "
            f"example {example_id!r} ({answer.text!r} at {answer.start}). This is a bug in the "
            "offset shift; please report it with the input file."
        )


def _shift_answers(answers: Sequence[Answer], offset: int) -> tuple[Answer, ...]:
    return tuple(dataclasses.replace(answer, start=answer.start + offset) for answer in answers)


def _join(contexts: Sequence[str], separator: str) -> tuple[str, list[int]]:
    """Join contexts and return the joined text and the start offset of each context."""
    offsets = []
    position = 0
    for context in contexts:
        offsets.append(position)
        position += len(context) + len(separator)
    return separator.join(contexts), offsets


def concatenate_original(examples: Sequence[QAExample], *, k: int = 3) -> list[QAExample]:
    """Build the concatenated set exactly as the original SQ3/XQ3 construction did.

    Args:
        examples: Input examples in data-set order (rows of one paragraph next to each other).
        k: Number of contexts per group.

    Returns:
        One example per kept row (the first question of each run of equal contexts), with the
        group's contexts joined without separator and its answers shifted.

    Raises:
        ValueError: If k is not a positive integer or an input answer is misaligned.
        RuntimeError: If an output answer is misaligned (a bug).
    """
    _check_k(k)
    _check_input_alignment(examples)
    kept: list[QAExample] = []
    previous_context = None
    for example in examples:
        if example.context != previous_context:
            kept.append(example)
        previous_context = example.context

    output = []
    for group_start in range(0, len(kept), k):
        group = kept[group_start : group_start + k]
        context, offsets = _join([member.context for member in group], "")
        for position, member in enumerate(group):
            output.append(
                dataclasses.replace(
                    member,
                    context=context,
                    answers=_shift_answers(member.answers, offsets[position]),
                    metadata={
                        **member.metadata,
                        "gold_position": position,
                        "num_contexts": len(group),
                    },
                )
            )
    _check_output_alignment(output)
    return output


@dataclasses.dataclass
class _Paragraph:
    context: str
    article: int


def _gold_index(gold_position: str, k: int, rng: random.Random) -> int:
    if gold_position == "first":
        return 0
    if gold_position == "last":
        return k - 1
    if gold_position == "middle":
        # For even k this is the earlier of the two middle slots.
        return (k - 1) // 2
    return rng.randrange(k)


def _draw_distractors(
    gold: int, count: int, article_range: tuple[int, int], total: int, rng: random.Random
) -> list[int]:
    """Draw `count` distinct paragraph indices other than `gold`, from other articles first.

    Paragraphs are numbered so that each article's paragraphs are the contiguous range
    `article_range` = [low, high); sampling a range by index keeps each draw O(count).
    """
    low, high = article_range
    num_other = total - (high - low)
    from_other = min(count, num_other)
    drawn = [i if i < low else i + (high - low) for i in rng.sample(range(num_other), from_other)]
    if from_other < count:
        # Too few other articles: fill up with other paragraphs of the same article.
        same_article = [i for i in range(low, high) if i != gold]
        drawn += rng.sample(same_article, count - from_other)
    return drawn


def concatenate_shuffled(
    examples: Sequence[QAExample],
    *,
    k: int = 3,
    separator: str = DEFAULT_SEPARATOR,
    gold_position: Literal["first", "middle", "last", "random"] = "random",
    seed: int = 0,
) -> list[QAExample]:
    """Build a concatenated set with every question, seeded distractors and a placed gold.

    Paragraphs are deduplicated by their exact text. Articles are identified by title, and
    an empty title counts as an article of its own, so files without titles draw distractors
    from every other paragraph. The result depends only on the input order and the seed.

    NOTE: a distractor may contain one of the gold answer strings; scoring by text then
    accepts a span taken from the distractor.

    Args:
        examples: Input examples.
        k: Contexts per example, the gold one included.
        separator: Text placed between contexts.
        gold_position: Where the gold context goes: "first", "middle" (index (k - 1) // 2),
            "last", or "random" (uniform per example).
        seed: Seed of the `random.Random` that draws distractors and random positions.

    Returns:
        One example per input question, in input order, with `gold_position` and
        `num_contexts` in its metadata.

    Raises:
        ValueError: If an argument is invalid, an input answer is misaligned, or there are
            fewer than k distinct contexts.
        RuntimeError: If an output answer is misaligned (a bug).
    """
    _check_k(k)
    if gold_position not in GOLD_POSITIONS:
        raise ValueError(
            f"gold_position must be one of {', '.join(GOLD_POSITIONS)}, got {gold_position!r}."
        )
    _check_input_alignment(examples)

    # Number distinct contexts so that each article's paragraphs are contiguous.
    article_ids: dict[str, int] = {}
    article_paragraphs: list[list[str]] = []
    seen_contexts: set[str] = set()
    for example in examples:
        if example.context in seen_contexts:
            continue
        seen_contexts.add(example.context)
        if example.title:
            article = article_ids.setdefault(example.title, len(article_paragraphs))
        else:
            article = len(article_paragraphs)
        if article == len(article_paragraphs):
            article_paragraphs.append([])
        article_paragraphs[article].append(example.context)

    paragraphs: list[_Paragraph] = []
    article_ranges: list[tuple[int, int]] = []
    for article, contexts in enumerate(article_paragraphs):
        start = len(paragraphs)
        paragraphs.extend(_Paragraph(context, article) for context in contexts)
        article_ranges.append((start, len(paragraphs)))
    index_of_context = {paragraph.context: i for i, paragraph in enumerate(paragraphs)}
    if len(paragraphs) < k:
        raise ValueError(
            f"k={k} needs at least {k} distinct contexts, but the input has {len(paragraphs)}. "
            "Use a smaller k or a larger input."
        )

    rng = random.Random(seed)
    output = []
    for example in examples:
        gold = index_of_context[example.context]
        position = _gold_index(gold_position, k, rng)
        distractors = _draw_distractors(
            gold, k - 1, article_ranges[paragraphs[gold].article], len(paragraphs), rng
        )
        order = distractors[:position] + [gold] + distractors[position:]
        context, offsets = _join([paragraphs[i].context for i in order], separator)
        output.append(
            dataclasses.replace(
                example,
                context=context,
                answers=_shift_answers(example.answers, offsets[position]),
                metadata={**example.metadata, "gold_position": position, "num_contexts": k},
            )
        )
    _check_output_alignment(output)
    return output


def build_concatenated(
    examples: Sequence[QAExample],
    *,
    k: int = 3,
    mode: Literal["original", "shuffled"] = "shuffled",
    separator: str | None = None,
    gold_position: Literal["first", "middle", "last", "random"] | None = None,
    seed: int = 0,
) -> list[QAExample]:
    """Build a concatenated set with either construction.

    Args:
        examples: Input examples in data-set order.
        k: Contexts per example.
        mode: "original" (the published SQ3/XQ3 construction) or "shuffled".
        separator: Text between contexts for "shuffled" (default a blank line). "original"
            joins without separator and accepts only None or "".
        gold_position: Gold placement for "shuffled" (default "random"). "original" takes the
            position from the data-set order and accepts only None.
        seed: Seed for "shuffled"; "original" draws nothing at random.

    Returns:
        The concatenated examples.

    Raises:
        ValueError: If the mode is unknown or an option does not apply to the mode, or as the
            construction functions.
        RuntimeError: As the construction functions.
    """
    if mode == "original":
        if separator:
            raise ValueError(
                f"mode='original' joins contexts with no separator, got separator {separator!r}."
                " Drop the separator, or use mode='shuffled'."
            )
        if gold_position is not None:
            raise ValueError(
                f"mode='original' places contexts in data-set order, got gold_position "
                f"{gold_position!r}. Drop gold_position, or use mode='shuffled'."
            )
        return concatenate_original(examples, k=k)
    if mode == "shuffled":
        return concatenate_shuffled(
            examples,
            k=k,
            separator=DEFAULT_SEPARATOR if separator is None else separator,
            gold_position=gold_position or "random",
            seed=seed,
        )
    raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")


def _unescape_separator(text: str) -> str:
    """Expand the escapes \\n and \\t typed on a command line; other text stays as given."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m longflax.data.concat",
        description="Build a long-context SQuAD-format set by joining k contexts per example.",
    )
    parser.add_argument("--input", required=True, help="SQuAD-format JSON input (.json[.gz]).")
    parser.add_argument(
        "--output", required=True, help="Output file, SQuAD v1.1 JSON (gzipped if .gz)."
    )
    parser.add_argument("--k", type=int, default=3, help="Contexts per example (default 3).")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="shuffled",
        help=(
            "original: the published SQ3/XQ3 construction (first question per paragraph, "
            "consecutive groups, no separator). shuffled (default): every question, seeded "
            "distractors, controlled gold position, separator."
        ),
    )
    parser.add_argument(
        "--separator",
        help=(
            "Text between contexts in shuffled mode (default a blank line); \\n and \\t are "
            "expanded."
        ),
    )
    parser.add_argument(
        "--gold-position",
        choices=GOLD_POSITIONS,
        help="Where the gold context goes in shuffled mode (default random).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Random seed for shuffled mode (default 0)."
    )
    parser.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="What to do with invalid input questions, such as misaligned answers.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; see `python -m longflax.data.concat --help`.

    Args:
        argv: Arguments without the program name; `sys.argv[1:]` when None.

    Returns:
        The exit status, 0 on success. Invalid input exits with status 2 and a message.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    separator = None if args.separator is None else _unescape_separator(args.separator)
    try:
        examples, report = load_squad_with_report(args.input, on_invalid=args.on_invalid)
        output = build_concatenated(
            examples,
            k=args.k,
            mode=args.mode,
            separator=separator,
            gold_position=args.gold_position,
            seed=args.seed,
        )
        save_squad(output, args.output)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")

    mean_length = statistics.fmean(len(e.context) for e in output) if output else 0.0
    logging.info("Wrote %d examples to %s", len(output), args.output)
    print(
        f"input: {report.num_loaded} questions ({report.num_invalid} invalid skipped) from "
        f"{args.input}\n"
        f"output: {len(output)} examples to {args.output}\n"
        f"mode: {args.mode}, k={args.k}\n"
        f"mean context length: {mean_length:.0f} characters"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
