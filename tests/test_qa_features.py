"""Tests for longflax.data.qa_features: windows, offsets, labels, global mask and batches."""

import logging

import numpy as np
import pytest
import tokenizer_fixtures
from tokenizers import Tokenizer
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast, RobertaTokenizerFast

from longflax.data.qa_features import iterate_batches, prepare_qa_features
from longflax.data.squad import Answer, QAExample, load_squad

TOKENIZER_NAMES = ["roberta", "sentencepiece", "bert"]

PARIS = "Paris is the capital of France."
PARIS_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def tokenizers_by_name(data_dir):
    return tokenizer_fixtures.all_tokenizers()


def example(context, question="What is it?", answer=None, start=None, example_id="q0"):
    """Build a QAExample whose answer starts, unless given, at the first occurrence of its text."""
    answers = ()
    if answer is not None:
        answers = (Answer(answer, context.index(answer) if start is None else start),)
    return QAExample(example_id, "", context, question, answers, {})


def count_tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def labelled_text(features, row, context):
    """Return the context characters between the offsets of a row's labelled span."""
    offsets = features.offset_mapping[row]
    start, end = features.start_positions[row], features.end_positions[row]
    return context[offsets[start, 0] : offsets[end, 1]]


def global_positions(features, row):
    return set(np.flatnonzero(features.global_attention_mask[row]).tolist())


# ------------------------------------------------------------------------------------------
# Test tokenizers


def test_sentencepiece_tokenizer_uses_xlmr_ids(tokenizers_by_name):
    tokenizer = tokenizers_by_name["sentencepiece"]
    ids = tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])

    assert ids[:4] == [0, 1, 2, 3]
    assert ids[4] == len(tokenizer) - 1
    pair = tokenizer("the", "of")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(pair) == ["<s>", "▁the", "</s>", "</s>", "▁of", "</s>"]


def test_sentencepiece_tokenizer_normalises_like_xlmr(tokenizers_by_name):
    tokenizer = tokenizers_by_name["sentencepiece"]
    tokens = tokenizer.tokenize("答案？……")
    # nmt_nfkc turns the full-width question mark and the ellipses into ASCII.
    assert "?" in tokens
    assert "？" not in "".join(tokens)
    assert "…" not in "".join(tokens)


# ------------------------------------------------------------------------------------------
# Answer offsets: first character and leading space


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
@pytest.mark.parametrize(("answer", "start"), [("Paris", 0), ("France", 24)])
def test_training_span_maps_back_exactly(tokenizers_by_name, name, answer, start):
    features = prepare_qa_features(
        [example(PARIS, PARIS_QUESTION, answer, start)],
        tokenizers_by_name[name],
        max_length=64,
        doc_stride=16,
        max_question_tokens=32,
        training=True,
    )

    assert features.num_answers_not_found == 0
    assert features.start_positions[0] > 0
    assert labelled_text(features, 0, PARIS) == answer


@pytest.mark.parametrize(
    ("context", "start", "answer"),
    [
        ("Quality of work is sufficient", 19, "sufficient"),
        ("答案？……北京是首都", 5, "北京"),
        ("une part, et La Société\u202f……dont le siège", 34, "siège"),
    ],
)
def test_sentencepiece_round_trip_on_awkward_text(tokenizers_by_name, context, start, answer):
    assert context[start : start + len(answer)] == answer
    features = prepare_qa_features(
        [example(context, "Where?", answer, start)],
        tokenizers_by_name["sentencepiece"],
        max_length=64,
        doc_stride=16,
        max_question_tokens=16,
        training=True,
    )

    assert features.num_answers_not_found == 0
    assert labelled_text(features, 0, context).strip() == answer


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_offsets_survive_save_and_reload(tokenizers_by_name, name, tmp_path):
    tokenizer = tokenizers_by_name[name]
    text = "hello world son"
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)

    built = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    loaded = reloaded(text, add_special_tokens=False, return_offsets_mapping=True)

    assert type(reloaded) is type(tokenizer)
    assert loaded["input_ids"] == built["input_ids"]
    assert loaded["offset_mapping"] == built["offset_mapping"]
    starts = [start for start, _ in built["offset_mapping"]]
    assert all(text[start] != " " for start in starts)
    assert {0, 6, 12} <= set(starts)


# ------------------------------------------------------------------------------------------
# Layout and global attention


def test_xlmr_row_layout_and_global_mask(tokenizers_by_name):
    tokenizer = tokenizers_by_name["sentencepiece"]
    question, context = "the of is", " ".join(["the"] * 10)
    assert count_tokens(tokenizer, question) == 3
    assert count_tokens(tokenizer, context) == 10

    features = prepare_qa_features(
        [example(context, question)],
        tokenizer,
        max_length=19,
        doc_stride=0,
        max_question_tokens=8,
        training=False,
    )

    row = features.input_ids[0]
    assert row[0] == 0
    assert list(row[4:6]) == [2, 2]
    assert row[16] == 2
    assert list(row[17:]) == [1, 1]
    assert global_positions(features, 0) == {0, 1, 2, 3}
    assert list(features.attention_mask[0]) == [1] * 17 + [0, 0]
    assert (features.offset_mapping[0, :6] == -1).all()
    assert (features.offset_mapping[0, 6:16] >= 0).all()
    assert (features.offset_mapping[0, 16:] == -1).all()


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_global_mask_per_row_question_length(tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    short, long = "the of is", "the of is the of is the"
    assert count_tokens(tokenizer, short) == 3
    assert count_tokens(tokenizer, long) == 7

    features = prepare_qa_features(
        [example(PARIS, short, example_id="a"), example(PARIS, long, example_id="b")],
        tokenizer,
        max_length=48,
        doc_stride=8,
        max_question_tokens=16,
        training=False,
    )

    assert global_positions(features, 0) == set(range(4))
    assert global_positions(features, 1) == set(range(8))


@pytest.mark.parametrize("name", ["roberta", "sentencepiece"])
def test_separator_text_in_context_keeps_global_mask(tokenizers_by_name, name):
    tokenizer = tokenizers_by_name[name]
    plain = "Paris is the capital of France."
    with_separator = "Paris is the capital </s> of France."

    features = prepare_qa_features(
        [example(plain, PARIS_QUESTION, example_id="a"), example(with_separator, PARIS_QUESTION)],
        tokenizer,
        max_length=48,
        doc_stride=8,
        max_question_tokens=16,
        training=False,
    )

    # The literal text becomes a real separator id, so counting separators would misplace the
    # question/context boundary.
    assert np.count_nonzero(features.input_ids[1] == tokenizer.sep_token_id) == 4
    assert global_positions(features, 1) == global_positions(features, 0)
    assert global_positions(features, 0) == set(range(1 + count_tokens(tokenizer, PARIS_QUESTION)))


def test_bert_token_types_follow_pair_template(tokenizers_by_name):
    tokenizer = tokenizers_by_name["bert"]
    features = prepare_qa_features(
        [example(PARIS, PARIS_QUESTION)],
        tokenizer,
        max_length=24,
        doc_stride=0,
        max_question_tokens=16,
        training=False,
    )
    reference = tokenizer(PARIS_QUESTION, PARIS, padding="max_length", max_length=24)

    assert list(features.token_type_ids[0]) == reference["token_type_ids"]
    assert list(features.input_ids[0]) == reference["input_ids"]
    assert global_positions(features, 0) == set(range(8))


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_windows_match_fast_tokenizer_overflow(tokenizers_by_name, data_dir, name):
    tokenizer = tokenizers_by_name[name]
    examples = load_squad(data_dir / "squad" / "dev-v1.1.json.gz", limit=40)

    features = prepare_qa_features(
        examples,
        tokenizer,
        max_length=96,
        doc_stride=24,
        max_question_tokens=64,
        training=False,
    )
    reference = tokenizer(
        [ex.question for ex in examples],
        [ex.context for ex in examples],
        truncation="only_second",
        max_length=96,
        stride=24,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )

    assert len(features) == len(reference["input_ids"]) > len(examples)
    assert features.example_index.tolist() == reference["overflow_to_sample_mapping"]
    np.testing.assert_array_equal(features.input_ids, reference["input_ids"])
    np.testing.assert_array_equal(features.attention_mask, reference["attention_mask"])
    if "token_type_ids" in reference:
        np.testing.assert_array_equal(features.token_type_ids, reference["token_type_ids"])
    for row in range(len(features)):
        sequence_ids = np.array(
            [-1 if s is None else s for s in reference.sequence_ids(row)], dtype=np.int32
        )
        context = sequence_ids == 1
        expected = np.array(reference["offset_mapping"][row], dtype=np.int32)
        np.testing.assert_array_equal(features.offset_mapping[row][context], expected[context])
        assert (features.offset_mapping[row][~context] == -1).all()


# ------------------------------------------------------------------------------------------
# Windows over long contexts


@pytest.fixture(scope="module")
def long_context(tokenizers_by_name):
    """A 10-token question and a 10,000-token context for the RoBERTa tokenizer."""
    tokenizer = tokenizers_by_name["roberta"]
    words = ["river", "stone", "bridge", "garden", "window", "market", "winter", "letter"]
    context = " ".join(words[i % len(words)] for i in range(10_000))
    question = "What is the name of the city in the story"
    assert count_tokens(tokenizer, question) == 10
    encoding = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    assert len(encoding["input_ids"]) == 10_000
    return tokenizer, question, context, encoding["offset_mapping"]


def test_long_context_windows_cover_and_overlap(long_context):
    tokenizer, question, context, _ = long_context
    features = prepare_qa_features(
        [example(context, question)],
        tokenizer,
        max_length=4096,
        doc_stride=128,
        max_question_tokens=10,
        training=False,
    )

    capacity = 4096 - 10 - 4
    starts = features.window_start.tolist()
    lengths = (features.offset_mapping[..., 0] >= 0).sum(axis=1).tolist()
    assert starts == [0, capacity - 128, 2 * (capacity - 128)]
    assert lengths == [capacity, capacity, 10_000 - starts[2]]
    covered = np.zeros(10_000, dtype=bool)
    for start, length in zip(starts, lengths, strict=True):
        covered[start : start + length] = True
    assert covered.all()
    for k in range(len(starts) - 1):
        assert starts[k] + lengths[k] - starts[k + 1] == 128
        # The last 128 context tokens of window k are the first 128 of window k + 1.
        previous = features.offset_mapping[k][features.offset_mapping[k, :, 0] >= 0][-128:]
        following = features.offset_mapping[k + 1][features.offset_mapping[k + 1, :, 0] >= 0]
        np.testing.assert_array_equal(previous, following[:128])
    assert features.windows_per_example.tolist() == [3]


def test_answer_across_window_boundary(long_context):
    tokenizer, question, context, offsets = long_context
    capacity = 4096 - 10 - 4
    first_token, last_token = capacity - 5, capacity + 4  # 5 tokens each side of the boundary
    char_start, char_end = offsets[first_token][0], offsets[last_token][1]
    answer = context[char_start:char_end]

    features = prepare_qa_features(
        [example(context, question, answer, char_start)],
        tokenizer,
        max_length=4096,
        doc_stride=128,
        max_question_tokens=10,
        training=True,
    )

    context_column = 1 + 10 + 2
    second_start = capacity - 128
    assert (features.start_positions[0], features.end_positions[0]) == (0, 0)
    assert features.start_positions[1] == context_column + first_token - second_start
    assert features.end_positions[1] == context_column + last_token - second_start
    assert labelled_text(features, 1, context) == answer
    assert (features.start_positions[2], features.end_positions[2]) == (0, 0)


def test_zero_stride_keeps_first_window(long_context):
    tokenizer, question, context, _ = long_context
    features = prepare_qa_features(
        [example(context, question), example(PARIS, question, example_id="short")],
        tokenizer,
        max_length=4096,
        doc_stride=0,
        max_question_tokens=10,
        training=False,
    )

    assert features.windows_per_example.tolist() == [1, 1]
    assert features.num_truncated_contexts == 1
    assert features.attention_mask[0].all()


def test_overlap_not_below_capacity_raises(long_context):
    tokenizer, question, context, _ = long_context
    with pytest.raises(ValueError, match=r"doc_stride=4082 must be smaller than the context"):
        prepare_qa_features(
            [example(context, question)],
            tokenizer,
            max_length=4096,
            doc_stride=4082,
            max_question_tokens=10,
            training=False,
        )


# ------------------------------------------------------------------------------------------
# Questions, labels and padding


def test_long_question_is_cut(tokenizers_by_name, caplog):
    caplog.set_level(logging.INFO)
    tokenizer = tokenizers_by_name["roberta"]
    question = " ".join(["city"] * 20)
    features = prepare_qa_features(
        [example(PARIS, question, "France"), example(PARIS, "Which?", "Paris", example_id="q1")],
        tokenizer,
        max_length=48,
        doc_stride=8,
        max_question_tokens=5,
        training=True,
    )

    city = tokenizer.convert_tokens_to_ids(["city", "Ġcity"])
    assert features.num_truncated_questions == 1
    assert features.input_ids[0, 1:6].tolist() == [city[0]] + [city[1]] * 4
    assert global_positions(features, 0) == set(range(6))
    assert labelled_text(features, 0, PARIS) == "France"
    assert "Cut 1 questions to max_question_tokens=5 (first ids: ['q0'])" in caplog.text


def test_misaligned_answer_is_counted(tokenizers_by_name, caplog):
    wrong_start = QAExample("bad", "", PARIS, PARIS_QUESTION, (Answer("France", 3),), {})
    features = prepare_qa_features(
        [wrong_start, example(PARIS, PARIS_QUESTION, "Paris")],
        tokenizers_by_name["roberta"],
        max_length=48,
        doc_stride=8,
        max_question_tokens=16,
        training=True,
    )

    assert features.num_answers_not_found == 1
    assert (features.start_positions[0], features.end_positions[0]) == (0, 0)
    assert features.start_positions[1] > 0
    assert "1 training answers match no context token" in caplog.text
    assert "(first ids: ['bad'])" in caplog.text


def test_repeated_space_token_never_bounds_answer(tokenizers_by_name):
    tokenizer = tokenizers_by_name["roberta"]
    context = "Paris is the  capital of France."
    offsets = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    # Byte-level BPE leaves a "Ġ" token that covers no character for the second space.
    assert (13, 13) in offsets["offset_mapping"]
    features = prepare_qa_features(
        [example(context, PARIS_QUESTION, "capital")],
        tokenizer,
        max_length=48,
        doc_stride=8,
        max_question_tokens=16,
        training=True,
    )

    assert labelled_text(features, 0, context) == "capital"


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_real_squad_labels_recover_answers(tokenizers_by_name, data_dir, name):
    examples = load_squad(data_dir / "squad" / "dev-v1.1.json.gz", limit=300)
    features = prepare_qa_features(
        examples,
        tokenizers_by_name[name],
        max_length=128,
        doc_stride=32,
        max_question_tokens=48,
        training=True,
    )

    assert features.num_answers_not_found == 0
    recovered = {}
    for row in np.flatnonzero(features.start_positions > 0):
        ex = examples[features.example_index[row]]
        recovered[ex.id] = labelled_text(features, row, ex.context)
    # Every answer lies wholly inside at least one 128-token window here.
    assert len(recovered) == len(examples)
    uncased = name == "bert"
    for ex in examples:
        gold = ex.answers[0].text
        # The labelled tokens may extend past the answer's boundaries inside a word
        # ("1990s" for "1990"), but always contain it.
        assert gold.lower() in recovered[ex.id].lower() if uncased else gold in recovered[ex.id]


def test_real_xquad_chinese_labels_recover_answers(tokenizers_by_name, data_dir):
    examples = load_squad(data_dir / "xquad" / "xquad.zh.json", limit=200)
    features = prepare_qa_features(
        examples,
        tokenizers_by_name["sentencepiece"],
        max_length=256,
        doc_stride=64,
        max_question_tokens=64,
        training=True,
    )

    assert features.num_answers_not_found == 0
    rows = np.flatnonzero(features.start_positions > 0)
    assert {int(features.example_index[row]) for row in rows} == set(range(len(examples)))
    for row in rows:
        ex = examples[features.example_index[row]]
        assert ex.answers[0].text in labelled_text(features, row, ex.context)


def test_pad_to_multiple_of_pads_to_longest(tokenizers_by_name):
    features = prepare_qa_features(
        [example(PARIS, PARIS_QUESTION)],
        tokenizers_by_name["roberta"],
        max_length=512,
        doc_stride=64,
        max_question_tokens=64,
        training=False,
        pad_to_multiple_of=8,
    )

    assert features.seq_length == 24  # 18 real tokens rounded up to a multiple of 8
    assert features.attention_mask.sum() == 18
    assert (features.input_ids[0, 18:] == 1).all()


def test_caller_tokenizer_settings_kept(tokenizers_by_name):
    tokenizer = RobertaTokenizerFast(
        tokenizer_object=Tokenizer.from_str(
            tokenizers_by_name["roberta"].backend_tokenizer.to_str()
        )
    )
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)

    features = prepare_qa_features(
        [example(PARIS, PARIS_QUESTION, "France")],
        tokenizer,
        max_length=48,
        doc_stride=8,
        max_question_tokens=16,
        training=True,
    )

    assert labelled_text(features, 0, PARIS) == "France"
    assert tokenizer.backend_tokenizer.truncation["max_length"] == 4


# ------------------------------------------------------------------------------------------
# Batches


def small_features(tokenizer, count):
    examples = [example(PARIS, PARIS_QUESTION, "France", example_id=f"q{i}") for i in range(count)]
    return prepare_qa_features(
        examples, tokenizer, max_length=32, doc_stride=8, max_question_tokens=16, training=True
    )


def test_batches_pad_last_and_keep_everything(tokenizers_by_name):
    features = small_features(tokenizers_by_name["roberta"], 5)
    batches = list(iterate_batches(features, 2))

    assert len(batches) == 3
    for batch in batches:
        assert batch["input_ids"].shape == (2, 32)
        assert batch["start_positions"].shape == (2,)
    assert batches[-1]["valid"].tolist() == [True, False]
    assert batches[-1]["feature_index"].tolist() == [4, -1]
    np.testing.assert_array_equal(batches[-1]["input_ids"][1], features.input_ids[4])
    seen = np.concatenate([b["feature_index"][b["valid"]] for b in batches])
    assert sorted(seen.tolist()) == list(range(5))


def test_batches_shuffle_with_seed(tokenizers_by_name):
    features = small_features(tokenizers_by_name["roberta"], 7)

    def order(seed):
        batches = iterate_batches(features, 3, shuffle=True, seed=seed)
        return np.concatenate([b["feature_index"][b["valid"]] for b in batches]).tolist()

    assert sorted(order(0)) == list(range(7))
    assert order(0) == order(0)
    assert order(0) != list(range(7))


def test_batches_without_labels(tokenizers_by_name):
    features = prepare_qa_features(
        [example(PARIS)],
        tokenizers_by_name["roberta"],
        max_length=32,
        doc_stride=8,
        max_question_tokens=16,
        training=False,
    )
    (batch,) = iterate_batches(features, 4)

    assert features.start_positions is None
    assert "start_positions" not in batch
    assert batch["valid"].tolist() == [True, False, False, False]


# ------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(max_length=0), r"max_length must be a positive number of tokens, got 0"),
        (dict(doc_stride=-1), r"doc_stride must be 0 \(keep only the first window\) or a"),
        (dict(max_question_tokens=0), r"max_question_tokens must be a positive number"),
        (dict(pad_to_multiple_of=0), r"pad_to_multiple_of must be a positive number of tokens"),
        (dict(pad_to_multiple_of=5), r"max_length=64 is not a multiple of pad_to_multiple_of=5"),
        (
            dict(max_length=20, max_question_tokens=16),
            r"max_length=20 leaves no room for the context after max_question_tokens=16",
        ),
        (dict(doc_stride=44), r"doc_stride=44 must be smaller than the context capacity of a"),
    ],
)
def test_invalid_lengths_raise(tokenizers_by_name, arguments, message):
    settings = dict(max_length=64, doc_stride=8, max_question_tokens=16, training=False)
    settings.update(arguments)
    with pytest.raises(ValueError, match=message):
        prepare_qa_features([example(PARIS)], tokenizers_by_name["roberta"], **settings)


def test_input_errors(tokenizers_by_name):
    tokenizer = tokenizers_by_name["roberta"]
    settings = dict(max_length=64, doc_stride=8, max_question_tokens=16)

    with pytest.raises(ValueError, match=r"examples is empty"):
        prepare_qa_features([], tokenizer, training=False, **settings)
    with pytest.raises(
        ValueError, match=r"1 training examples have no answer \(first ids: \['q0'\]"
    ):
        prepare_qa_features([example(PARIS)], tokenizer, training=True, **settings)
    with pytest.raises(ValueError, match=r"batch_size must be a positive number of rows, got 0"):
        next(iterate_batches(small_features(tokenizer, 1), 0))


def test_tokenizer_errors(tokenizers_by_name):
    backend = Tokenizer.from_str(tokenizers_by_name["roberta"].backend_tokenizer.to_str())
    settings = dict(max_length=64, doc_stride=8, max_question_tokens=16, training=False)

    with pytest.raises(
        ValueError, match=r"Tokenizer has no backend_tokenizer, but QA features need"
    ):
        prepare_qa_features([example(PARIS)], backend, **settings)
    without_pad = PreTrainedTokenizerFast(tokenizer_object=backend)
    with pytest.raises(ValueError, match=r"has no padding token. Set tokenizer.pad_token"):
        prepare_qa_features([example(PARIS)], without_pad, **settings)


def test_tokenizer_dropping_text_raises():
    # A BPE model without an unknown token silently drops characters outside its vocabulary.
    backend = Tokenizer(BPE(vocab={"<pad>": 0, "x": 1}, merges=[]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")

    with pytest.raises(ValueError, match=r"returned no token for the text 'a' or 'b' of a probe"):
        prepare_qa_features(
            [example(PARIS)],
            tokenizer,
            max_length=64,
            doc_stride=8,
            max_question_tokens=16,
            training=False,
        )
