"""Tests for longflax.data.concat: the original SQ3 construction and the shuffled default."""

import collections
import os
import pathlib
import subprocess
import sys

import pytest

from longflax.data import concat
from longflax.data.squad import Answer, QAExample, find_misaligned_answers, load_squad, save_squad

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

P1 = "Paris is the capital of France."
P2 = " Berlin hosts the Bundestag; the Reichstag was rebuilt in 1999."
P3 = "Rome was founded, by legend, in 753 BC."


def example(example_id, context, answers, title="T"):
    spans = tuple(Answer(text, context.index(text)) for text in answers)
    return QAExample(example_id, title, context, f"{example_id}?", spans, {})


@pytest.fixture
def three_paragraphs():
    """Questions of three paragraphs from three articles, several answers per question."""
    return [
        example("p1-a", P1, ["Paris", "France"], title="France"),
        example("p1-b", P1, ["capital"], title="France"),
        example("p2-a", P2, ["Bundestag", "the Bundestag"], title="Germany"),
        example("p2-b", P2, ["1999"], title="Germany"),
        example("p3-a", P3, ["753 BC"], title="Italy"),
    ]


def assert_all_aligned(examples):
    for built in examples:
        for answer in built.answers:
            assert built.context[answer.start : answer.start + len(answer.text)] == answer.text


# ------------------------------------------------------------------------------------------
# Shuffled mode


@pytest.mark.parametrize("seed", range(4))
def test_shuffled_middle_shifts_by_preceding_context_and_separator(three_paragraphs, seed):
    separator = " ||| "
    built = concat.concatenate_shuffled(
        three_paragraphs, k=3, separator=separator, gold_position="middle", seed=seed
    )
    by_id = {e.id: e for e in built}
    question = by_id["p2-a"]
    segments = question.context.split(separator)
    assert segments[1] == P2
    assert sorted(segments) == sorted([P1, P2, P3])
    local_start = P2.index("Bundestag")
    assert question.answers[0].start == len(segments[0]) + len(separator) + local_start
    if segments[0] == P1:
        assert question.answers[0].start == len(P1) + len(separator) + local_start
    assert_all_aligned(built)


@pytest.mark.parametrize(("gold_position", "index"), [("first", 0), ("middle", 1), ("last", 2)])
def test_shuffled_gold_position_and_metadata(three_paragraphs, gold_position, index):
    separator = "\n\n"
    built = concat.concatenate_shuffled(three_paragraphs, k=3, gold_position=gold_position)
    assert [e.id for e in built] == [e.id for e in three_paragraphs]
    for original, new in zip(three_paragraphs, built, strict=True):
        segments = new.context.split(separator)
        assert len(segments) == 3
        assert segments[index] == original.context
        assert len(set(segments)) == 3
        assert new.metadata == {"gold_position": index, "num_contexts": 3}
        offset = sum(len(s) + len(separator) for s in segments[:index])
        assert [a.start for a in new.answers] == [a.start + offset for a in original.answers]
        assert [a.text for a in new.answers] == [a.text for a in original.answers]
    assert find_misaligned_answers(built) == []


def test_shuffled_is_seeded():
    examples = [
        example(f"q{i}", f"Paragraph number {i} mentions {i}.", [str(i)], title=f"A{i % 5}")
        for i in range(40)
    ]
    first = concat.concatenate_shuffled(examples, k=4, seed=3)
    again = concat.concatenate_shuffled(examples, k=4, seed=3)
    other = concat.concatenate_shuffled(examples, k=4, seed=4)
    assert first == again
    assert [e.context for e in first] != [e.context for e in other]
    positions = collections.Counter(e.metadata["gold_position"] for e in first)
    assert set(positions) == {0, 1, 2, 3}


def test_shuffled_prefers_other_articles():
    examples = [
        example(f"q{i}", f"Paragraph {i} of the text.", [f"{i}"], title=f"A{i // 4}")
        for i in range(12)
    ]
    built = concat.concatenate_shuffled(examples, k=3, gold_position="first", seed=0)
    title_of = {e.context: e.title for e in examples}
    for original, new in zip(examples, built, strict=True):
        distractors = new.context.split("\n\n")[1:]
        assert all(title_of[d] != original.title for d in distractors)


def test_shuffled_fills_from_same_article_when_needed():
    examples = [
        example(f"q{i}", f"Paragraph {i} of the text.", [f"{i}"], title="Only") for i in range(3)
    ]
    built = concat.concatenate_shuffled(examples, k=3, seed=0)
    for new in built:
        assert sorted(new.context.split("\n\n")) == sorted(e.context for e in examples)
    assert_all_aligned(built)


def test_shuffled_dedups_paragraphs_and_keeps_every_question(three_paragraphs):
    duplicate_article = [e for e in three_paragraphs] + [
        example("p1-c", P1, ["France"], title="France copy")
    ]
    built = concat.concatenate_shuffled(duplicate_article, k=3)
    assert len(built) == len(duplicate_article)
    for new in built:
        assert new.context.count(P1) <= 1


def test_shuffled_k1_keeps_context(three_paragraphs):
    built = concat.concatenate_shuffled(three_paragraphs, k=1)
    assert [(e.context, e.answers) for e in built] == [
        (e.context, e.answers) for e in three_paragraphs
    ]


def test_shuffled_errors(three_paragraphs):
    with pytest.raises(
        ValueError, match=r"k \(contexts per example\) must be a positive integer, got 0"
    ):
        concat.concatenate_shuffled(three_paragraphs, k=0)
    with pytest.raises(
        ValueError, match=r"gold_position must be one of first, middle, last, random, got 'centre'"
    ):
        concat.concatenate_shuffled(three_paragraphs, gold_position="centre")
    with pytest.raises(
        ValueError, match=r"k=4 needs at least 4 distinct contexts, but the input has 3"
    ):
        concat.concatenate_shuffled(three_paragraphs, k=4)


def test_misaligned_input_raises(three_paragraphs):
    broken = QAExample("bad", "T", P1, "q", (Answer("Paris", 3),), {})
    for build in (concat.concatenate_shuffled, concat.concatenate_original):
        with pytest.raises(
            ValueError,
            match=r"1 input answers do not match their answer_start \(first ids: \['bad'\]\)",
        ):
            build([*three_paragraphs, broken])


def test_output_check_raises_on_misaligned_example():
    broken = QAExample("bad", "T", P1, "q", (Answer("Paris", 3),), {})
    with pytest.raises(
        RuntimeError, match=r"produced 1 misaligned answers, the first in example 'bad'"
    ):
        concat._check_output_alignment([broken])


# ------------------------------------------------------------------------------------------
# Original mode


def test_original_keeps_first_question_per_paragraph(three_paragraphs):
    p4 = "Madrid lies on the Manzanares."
    rows = [*three_paragraphs, example("p4-a", p4, ["Manzanares"], title="Spain")]
    built = concat.concatenate_original(rows, k=3)
    assert [e.id for e in built] == ["p1-a", "p2-a", "p3-a", "p4-a"]
    # Groups of three kept rows, joined without separator; the last group is shorter.
    assert built[0].context == P1 + P2 + P3
    assert built[1].context == P1 + P2 + P3
    assert built[3].context == p4
    assert built[1].answers == (
        Answer("Bundestag", len(P1) + P2.index("Bundestag")),
        Answer("the Bundestag", len(P1) + P2.index("the Bundestag")),
    )
    assert built[2].answers == (Answer("753 BC", len(P1) + len(P2) + P3.index("753 BC")),)
    assert [e.metadata["gold_position"] for e in built] == [0, 1, 2, 0]
    assert [e.metadata["num_contexts"] for e in built] == [3, 3, 3, 1]
    assert_all_aligned(built)


def test_original_compares_only_with_previous_row(three_paragraphs):
    # A context repeated after another one counts as new, as in the original construction.
    rows = [three_paragraphs[0], three_paragraphs[2], three_paragraphs[1]]
    built = concat.concatenate_original(rows, k=3)
    assert [e.id for e in built] == ["p1-a", "p2-a", "p1-b"]
    assert built[0].context == P1 + P2 + P1


def test_build_dispatches_and_rejects_options(three_paragraphs):
    original = concat.build_concatenated(three_paragraphs, mode="original", k=2)
    assert original == concat.concatenate_original(three_paragraphs, k=2)
    shuffled = concat.build_concatenated(three_paragraphs, gold_position="last", seed=5)
    assert shuffled == concat.concatenate_shuffled(three_paragraphs, gold_position="last", seed=5)
    with pytest.raises(
        ValueError, match=r"mode='original' joins contexts with no separator, got separator ' '"
    ):
        concat.build_concatenated(three_paragraphs, mode="original", separator=" ")
    with pytest.raises(
        ValueError,
        match=r"mode='original' places contexts in data-set order, got gold_position 'first'",
    ):
        concat.build_concatenated(three_paragraphs, mode="original", gold_position="first")
    with pytest.raises(ValueError, match=r"mode must be one of original, shuffled, got 'sq3'"):
        concat.build_concatenated(three_paragraphs, mode="sq3")


# ------------------------------------------------------------------------------------------
# Command line


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "longflax.data.concat", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_writes_squad_with_metadata(tmp_path, three_paragraphs):
    source = tmp_path / "in.json"
    save_squad(three_paragraphs, source)
    output = tmp_path / "out.json.gz"
    completed = run_cli(
        "--input", source, "--output", output, "--separator", "\\n--\\n", "--gold-position", "last"
    )
    assert completed.returncode == 0, completed.stderr
    assert "input: 5 questions" in completed.stdout
    assert "output: 5 examples" in completed.stdout
    assert "mode: shuffled, k=3" in completed.stdout
    assert "mean context length:" in completed.stdout
    built = load_squad(output)
    assert [e.metadata["gold_position"] for e in built] == [2] * 5
    assert all(e.context.count("\n--\n") == 2 for e in built)


def test_cli_rejects_invalid_input(tmp_path, capsys):
    broken = QAExample("bad", "T", P1, "q", (Answer("Paris", 3),), {})
    source = tmp_path / "in.json"
    save_squad([broken], source)
    with pytest.raises(SystemExit) as exit_info:
        concat.main(["--input", str(source), "--output", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    assert "answer_start does not point at the answer text: 1" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


# ------------------------------------------------------------------------------------------
# Real data


@pytest.fixture(scope="module")
def squad_dev(data_dir):
    return load_squad(data_dir / "squad" / "dev-v1.1.json.gz")


@pytest.mark.data
def test_original_on_squad_dev_gives_2067(squad_dev):
    built = concat.concatenate_original(squad_dev, k=3)
    assert len(built) == 2067
    assert find_misaligned_answers(built) == []
    paragraphs = list(dict.fromkeys(e.context for e in squad_dev))
    assert built[0].context == "".join(paragraphs[:3])
    assert built[-1].context == "".join(paragraphs[2064:])


@pytest.mark.data
def test_shuffled_on_squad_dev_keeps_all_questions(squad_dev):
    built = concat.concatenate_shuffled(squad_dev, k=3, seed=0)
    assert len(built) == 10570
    assert find_misaligned_answers(built) == []
    positions = collections.Counter(e.metadata["gold_position"] for e in built)
    assert set(positions) == {0, 1, 2}


@pytest.mark.data
@pytest.mark.slow
def test_original_on_reconstructed_train_gives_18895(data_dir):
    examples = load_squad(data_dir / "squad" / "train-v1.1.reconstructed.json.gz")
    assert len(concat.concatenate_original(examples, k=3)) == 18895
