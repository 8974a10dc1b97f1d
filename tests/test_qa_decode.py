"""Tests for longflax.tasks.qa_decode: span decoding from logits and prediction files."""

import json

import numpy as np
import pytest
import tokenizer_fixtures

from longflax.data.qa_features import prepare_qa_features
from longflax.data.squad import Answer, QAExample, load_squad
from longflax.tasks.qa_decode import decode_predictions, write_predictions

TOKENIZER_NAMES = ["roberta", "sentencepiece", "bert"]

PARIS = "Paris is the capital of France."
PARIS_QUESTION = "What is the capital of France?"
WORDS = ["river", "stone", "bridge", "garden", "window", "market", "winter", "letter"]


@pytest.fixture(scope="module")
def tokenizers_by_name(data_dir):
    return tokenizer_fixtures.all_tokenizers()


def example(context, question="What is it?", answer=None, start=None, example_id="q0"):
    answers = ()
    if answer is not None:
        answers = (Answer(answer, context.index(answer) if start is None else start),)
    return QAExample(example_id, "", context, question, answers, {})


def peaked_logits(features, peaks, *, length=None):
    """Return start and end logits of -5 everywhere except the given {(row, kind, pos): value}."""
    shape = (len(features), length or features.seq_length)
    logits = {"start": np.full(shape, -5.0, np.float32), "end": np.full(shape, -5.0, np.float32)}
    for (row, kind, position), value in peaks.items():
        logits[kind][row, position] = value
    return logits["start"], logits["end"]


def context_text(features, row, context, start, end):
    offsets = features.offset_mapping[row]
    return context[offsets[start, 0] : offsets[end, 1]]


# ------------------------------------------------------------------------------------------
# Answer text: first character and leading space


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize(("answer", "start"), [("Paris", 0), ("France", 24)])
def test_peaked_logits_give_exact_answer(tokenizers_by_name, name, answer, start):
    tokenizer = tokenizers_by_name[name]
    examples = [example(PARIS, PARIS_QUESTION, answer, start)]
    settings = dict(max_length=64, doc_stride=16, max_question_tokens=32)
    labelled = prepare_qa_features(examples, tokenizer, training=True, **settings)
    features = prepare_qa_features(examples, tokenizer, training=False, **settings)
    start_logits, end_logits = peaked_logits(
        features,
        {
            (0, "start", labelled.start_positions[0]): 10.0,
            (0, "end", labelled.end_positions[0]): 10.0,
        },
    )

    predictions, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert predictions == {"q0": answer}
    assert nbest["q0"][0]["text"] == answer
    assert nbest["q0"][0]["char_start"] == start


# ------------------------------------------------------------------------------------------
# Positions without offsets


@pytest.fixture(scope="module")
def padded_feature(tokenizers_by_name):
    """One RoBERTa feature: question at 1..12, context at 15..298, padding from 300 to 511."""
    tokenizer = tokenizers_by_name["roberta"]
    question = " ".join(["city"] * 12)
    context = " ".join(WORDS[i % len(WORDS)] for i in range(284))
    examples = [example(context, question)]
    features = prepare_qa_features(
        examples, tokenizer, max_length=512, doc_stride=0, max_question_tokens=16, training=False
    )
    assert features.global_attention_mask[0].sum() == 13
    assert (features.offset_mapping[0, 15:299, 0] >= 0).all()
    assert (features.offset_mapping[0, 299:, 0] == -1).all()
    assert features.attention_mask[0].sum() == 300
    return examples, features


def ranked_peaks(length=512):
    """Rank start logits 450 > 5 > 100 and end logits 451 > 3 > 104 above all others."""
    start = np.full((1, length), -5.0, np.float32)
    end = np.full((1, length), -5.0, np.float32)
    start[0, [450, 5, 100]] = [12.0, 11.0, 10.0]
    end[0, [451, 3, 104]] = [12.0, 11.0, 10.0]
    return start, end


def test_padding_and_question_peaks_ignored(padded_feature):
    examples, features = padded_feature
    context = examples[0].context
    start_logits, end_logits = ranked_peaks()

    predictions, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert predictions["q0"] == context_text(features, 0, context, 100, 104)
    assert nbest["q0"][0]["start_index"] == 100
    assert nbest["q0"][0]["end_index"] == 104
    assert len(nbest["q0"]) == 20
    for entry in nbest["q0"]:
        assert 15 <= entry["start_index"] <= 298
        assert 15 <= entry["end_index"] <= 298
        assert entry["start_index"] <= entry["end_index"]
        assert entry["end_index"] - entry["start_index"] + 1 <= 30
        assert entry["text"] == context[entry["char_start"] : entry["char_end"]]
    assert sum(entry["probability"] for entry in nbest["q0"]) == pytest.approx(1.0)


def test_logits_longer_than_features(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = ranked_peaks(length=1024)
    start_logits[0, 700] = end_logits[0, 701] = 50.0

    predictions, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert nbest["q0"][0]["start_index"] == 100
    assert nbest["q0"][0]["end_index"] == 104
    assert predictions["q0"] == context_text(features, 0, examples[0].context, 100, 104)


def test_first_token_never_chosen(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = ranked_peaks()
    start_logits[0, 0] = end_logits[0, 0] = 100.0

    _, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert all(entry["start_index"] > 0 for entry in nbest["q0"])
    assert nbest["q0"][0]["start_index"] == 100


def test_max_answer_length_limits_spans(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = peaked_logits(
        features, {(0, "start", 50): 10.0, (0, "end", 60): 10.0, (0, "end", 52): 5.0}
    )

    _, nbest = decode_predictions(
        examples, features, start_logits, end_logits, max_answer_length=5, n_best_size=5
    )

    assert (nbest["q0"][0]["start_index"], nbest["q0"][0]["end_index"]) == (50, 52)
    assert all(e["end_index"] - e["start_index"] < 5 for e in nbest["q0"])
    assert len(nbest["q0"]) == 5


# ------------------------------------------------------------------------------------------
# The older independent-argmax rule


def test_independent_argmax_on_padding_gives_empty(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = ranked_peaks()

    predictions, nbest = decode_predictions(
        examples, features, start_logits, end_logits, rule="independent_argmax"
    )

    assert predictions == {"q0": ""}
    assert (nbest["q0"][0]["start_index"], nbest["q0"][0]["end_index"]) == (450, 451)
    assert nbest["q0"][0]["char_start"] == -1


def test_independent_argmax_takes_unchecked_span(padded_feature):
    examples, features = padded_feature
    context = examples[0].context
    start_logits, end_logits = peaked_logits(features, {(0, "start", 40): 3.0, (0, "end", 90): 3.0})

    predictions, _ = decode_predictions(
        examples, features, start_logits, end_logits, rule="independent_argmax"
    )
    reversed_predictions, _ = decode_predictions(
        examples, features, end_logits, start_logits, rule="independent_argmax"
    )

    # 51 tokens: longer than max_answer_length, which this rule does not check.
    assert predictions["q0"] == context_text(features, 0, context, 40, 90)
    assert reversed_predictions["q0"] == ""


# ------------------------------------------------------------------------------------------
# Several windows per example


@pytest.fixture(scope="module")
def windowed(tokenizers_by_name):
    tokenizer = tokenizers_by_name["roberta"]
    context = " ".join(WORDS[i % len(WORDS)] for i in range(100))
    examples = [example(context, "Where?"), example(PARIS, PARIS_QUESTION, example_id="q1")]
    features = prepare_qa_features(
        examples, tokenizer, max_length=40, doc_stride=12, max_question_tokens=8, training=False
    )
    assert features.windows_per_example.tolist()[0] >= 4
    return examples, features


def test_best_span_across_windows(windowed):
    examples, features = windowed
    context = examples[0].context
    column = int(np.flatnonzero(features.offset_mapping[1, :, 0] >= 0)[-1])
    # The same tokens also open window 2, where they score lower.
    same_in_next = column - (features.window_start[2] - features.window_start[1])
    peaks = {
        (1, "start", column - 1): 8.0,
        (1, "end", column): 8.0,
        (2, "start", same_in_next - 1): 6.0,
        (2, "end", same_in_next): 6.0,
    }
    start_logits, end_logits = peaked_logits(features, peaks)

    predictions, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert predictions["q0"] == context_text(features, 1, context, column - 1, column)
    assert nbest["q0"][0]["feature_index"] == 1
    spans = [(e["char_start"], e["char_end"]) for e in nbest["q0"]]
    assert len(spans) == len(set(spans))
    assert predictions["q1"] != ""


def test_empty_context_gives_empty_prediction(tokenizers_by_name):
    examples = [example("", PARIS_QUESTION), example(PARIS, PARIS_QUESTION, example_id="q1")]
    features = prepare_qa_features(
        examples,
        tokenizers_by_name["roberta"],
        max_length=32,
        doc_stride=4,
        max_question_tokens=16,
        training=False,
    )
    start_logits, end_logits = peaked_logits(features, {})

    predictions, nbest = decode_predictions(examples, features, start_logits, end_logits)

    assert predictions["q0"] == ""
    assert nbest["q0"] == []
    assert nbest["q1"]


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_real_squad_gold_logits_recover_answers(tokenizers_by_name, data_dir, name):
    tokenizer = tokenizers_by_name[name]
    examples = load_squad(data_dir / "squad" / "dev-v1.1.json.gz", limit=200)
    settings = dict(max_length=128, doc_stride=32, max_question_tokens=48)
    labelled = prepare_qa_features(examples, tokenizer, training=True, **settings)
    features = prepare_qa_features(examples, tokenizer, training=False, **settings)
    start_logits, end_logits = peaked_logits(features, {})
    rows = np.arange(len(features))
    start_logits[rows, labelled.start_positions] = 10.0
    end_logits[rows, labelled.end_positions] = 10.0

    # Allow whole windows: the small SentencePiece model splits some answers into more than
    # the usual 30 tokens.
    predictions, _ = decode_predictions(
        examples, features, start_logits, end_logits, max_answer_length=128
    )

    exact = 0
    for ex in examples:
        gold, predicted = ex.answers[0].text, predictions[ex.id]
        if name == "bert":
            gold, predicted = gold.lower(), predicted.lower()
        assert gold in predicted
        assert predicted == predicted.strip()
        exact += gold == predicted
    # Only answers that end or start inside a token come back longer than the gold text.
    assert exact / len(examples) >= 0.95


# ------------------------------------------------------------------------------------------
# Prediction files


def test_write_predictions_round_trip(tmp_path):
    predictions = {"q0": "北京", "q1": ""}
    nbest = {"q0": [{"text": "北京", "score": 1.5, "probability": 1.0}], "q1": []}

    paths = write_predictions(tmp_path / "out", predictions, nbest)

    assert [p.name for p in paths] == ["predictions.json", "nbest_predictions.json"]
    assert json.loads(paths[0].read_text(encoding="utf-8")) == predictions
    assert json.loads(paths[1].read_text(encoding="utf-8")) == nbest
    assert "北京" in paths[0].read_text(encoding="utf-8")


def test_decoded_output_is_json_serialisable(padded_feature, tmp_path):
    examples, features = padded_feature
    predictions, nbest = decode_predictions(examples, features, *ranked_peaks())

    _, nbest_path = write_predictions(tmp_path, predictions, nbest)

    assert json.loads(nbest_path.read_text(encoding="utf-8")) == nbest


def test_write_predictions_rejects_mismatched_ids(tmp_path):
    with pytest.raises(
        ValueError, match=r"only in predictions are \['q1'\] and ids only in nbest are \[\]"
    ):
        write_predictions(tmp_path, {"q0": "a", "q1": "b"}, {"q0": []})


# ------------------------------------------------------------------------------------------
# Errors


def test_decode_argument_errors(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = ranked_peaks()

    with pytest.raises(ValueError, match=r"rule must be one of \('context_span', 'independent_"):
        decode_predictions(examples, features, start_logits, end_logits, rule="argmax")
    with pytest.raises(ValueError, match=r"n_best_size must be a positive number of candidates"):
        decode_predictions(examples, features, start_logits, end_logits, n_best_size=0)
    with pytest.raises(ValueError, match=r"max_answer_length must be a positive number of tokens"):
        decode_predictions(examples, features, start_logits, end_logits, max_answer_length=0)


def test_decode_input_errors(padded_feature):
    examples, features = padded_feature
    start_logits, end_logits = ranked_peaks()
    other = [example("Other text.", example_id="other")]

    with pytest.raises(ValueError, match=r"the 1 examples do not match the 1 examples the feat"):
        decode_predictions(other, features, start_logits, end_logits)
    with pytest.raises(ValueError, match=r"start_logits must have shape .* got \(1, 300\)"):
        decode_predictions(examples, features, start_logits[:, :300], end_logits)
    with pytest.raises(ValueError, match=r"end_logits must have shape .* got \(512,\)"):
        decode_predictions(examples, features, start_logits, end_logits[0])
    with pytest.raises(ValueError, match=r"start_logits must have shape .* got \(2, 512\)"):
        decode_predictions(examples, features, np.repeat(start_logits, 2, axis=0), end_logits)
