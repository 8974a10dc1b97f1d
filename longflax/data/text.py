"""Plain-text corpora for masked-LM training: reading, cutting into token blocks, batching.

The pipeline has three steps:

1. `read_documents` yields documents from local text files (plain or gzipped), from a Hugging
   Face dataset (`hf:NAME[:CONFIG]:SPLIT`) or from a TensorFlow Datasets data source
   (`tfds:NAME:SPLIT`).
2. `build_blocks` tokenises the documents with a Hugging Face fast tokenizer, joins them into one
   token stream with the separator token between documents and cuts the stream into blocks of
   `block_length` tokens: `<s> text... </s>` for RoBERTa, `[CLS] text... [SEP]` for BERT. Every
   token also carries the number of characters and UTF-8 bytes of text it covers, so language-model
   metrics can be reported per character and per byte.
3. `BlockIterator` serves fixed-shape batches of blocks in a seeded order and can save and restore
   its position, so a resumed run gets the same next batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import math
import os
import pathlib
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import tqdm
from absl import logging

LAYOUTS = ("paragraphs", "lines", "wikitext")

# Bump when the arrays stored in the cache change meaning, so that old cache files are not reused.
_CACHE_FORMAT_VERSION = 1

_HF_SPEC = re.compile(
    r"^hf:(?P<name>[^:]+)(?::(?P<config>[^:]+))?:(?P<split>[^:\[\]]+(?:\[[^\]]*\])?)$"
)
_TFDS_SPEC = re.compile(r"^tfds:(?P<name>[^:]+):(?P<split>.+)$")


# ---------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """One resolved input: a display name and a function that opens its lines."""

    name: str
    open_lines: Callable[[], Iterator[str]]


def read_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    layout: str,
    text_field: str = "text",
    tfds_data_dir: str | os.PathLike | None = None,
) -> Iterator[str]:
    """Read documents from text files, a Hugging Face dataset or a TensorFlow Datasets source.

    Sources are checked when this function is called: missing files, globs that match nothing,
    malformed `hf:`/`tfds:` specs, missing optional packages and datasets that cannot be loaded
    raise at once. Files are read lazily while the returned iterator is consumed.

    Every input is read as a sequence of lines, and `layout` groups lines into documents:

    * `"paragraphs"`: documents are separated by one or more blank (or whitespace-only) lines.
    * `"lines"`: every non-blank line is one document.
    * `"wikitext"`: the raw WikiText layout. An article starts at a title line such as
      ` = Title = `; sub-headings such as ` = = Section = = ` stay inside the article. Text before
      the first title is a document of its own.

    Each line is stripped of surrounding whitespace and the lines of one document are joined with
    a newline, so documents never start or end with whitespace. Title and heading lines stay in the
    text. Records of a Hugging Face or TensorFlow Datasets split are treated as lines, so
    `layout="lines"` makes each record a document and `layout="wikitext"` regroups the line records
    of the Hugging Face `wikitext` datasets into articles.

    Args:
        source: One source or a list of them. A source is a file path, a glob pattern (matches are
            read in sorted order), `hf:NAME[:CONFIG]:SPLIT` (NAME may be a Hub id or a local folder,
            SPLIT may carry a slice such as `train[:1000]`) or `tfds:NAME:SPLIT`. Files ending in
            `.gz` are decompressed. Files must be UTF-8; a byte-order mark and CRLF or CR line ends
            are accepted.
        layout: How lines are grouped into documents: `"paragraphs"`, `"lines"` or `"wikitext"`.
        text_field: Column (Hugging Face) or feature (TensorFlow Datasets) that contains the text.
        tfds_data_dir: Folder of prepared TensorFlow Datasets data; None uses the tfds default.

    Returns:
        An iterator over the documents, in source order.

    Raises:
        ValueError: If the layout is unknown, a file is missing, a glob matches nothing, a spec is
            malformed, a dataset has no `text_field`, a file is not UTF-8 or gzip, or a source
            contains no text. The last three are raised during iteration.
        RuntimeError: If `datasets` or `tensorflow_datasets` is needed but not installed, or the
            dataset cannot be loaded (for example offline and not in the local cache).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}.")
    if isinstance(source, (str, os.PathLike)):
        items = [source]
    else:
        items = list(source)
    if not items:
        raise ValueError(
            "read_documents got an empty list of sources; pass at least one file path, glob, "
            "'hf:NAME[:CONFIG]:SPLIT' or 'tfds:NAME:SPLIT'."
        )

    sources: list[_Source] = []
    for item in items:
        sources.extend(_resolve_source(item, text_field=text_field, tfds_data_dir=tfds_data_dir))
    return _iterate_documents(sources, layout)


def _resolve_source(
    item: str | os.PathLike, *, text_field: str, tfds_data_dir: str | os.PathLike | None
) -> list[_Source]:
    text = os.fspath(item)
    if text.startswith("hf:"):
        return [_resolve_hf(text, text_field)]
    if text.startswith("tfds:"):
        return [_resolve_tfds(text, text_field, tfds_data_dir)]

    if glob.has_magic(text):
        matches = sorted(path for path in glob.glob(text) if os.path.isfile(path))
        if not matches:
            raise ValueError(
                f"No files match the pattern {text!r}; check the path and the working directory "
                f"({os.getcwd()})."
            )
        return [_file_source(path) for path in matches]

    if not os.path.isfile(text):
        raise ValueError(f"Text file {text!r} not found or not a regular file; check the path.")
    return [_file_source(text)]


def _file_source(path: str) -> _Source:
    def open_lines() -> Iterator[str]:
        # "utf-8-sig" drops a leading byte-order mark; text mode turns CRLF and CR into "\n".
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            try:
                yield from handle
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"Text file {path!r} is not valid UTF-8 ({err}); convert it to UTF-8 first."
                ) from err
            except (gzip.BadGzipFile, EOFError) as err:
                raise ValueError(
                    f"Text file {path!r} ends in .gz but is not a complete gzip file ({err}); "
                    "decompress it or fix the file name."
                ) from err

    return _Source(name=path, open_lines=open_lines)


def _resolve_hf(spec: str, text_field: str) -> _Source:
    match = _HF_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"Invalid Hugging Face source {spec!r}; expected 'hf:NAME:SPLIT' or "
            "'hf:NAME:CONFIG:SPLIT', for example 'hf:wikitext:wikitext-103-raw-v1:train'."
        )
    name, config, split = match.group("name", "config", "split")
    try:
        import datasets  # Optional dependency.
    except ImportError as err:
        raise RuntimeError(
            f"Reading {spec!r} needs the Hugging Face 'datasets' package, which is not installed; "
            "install it with: pip install 'longflax[data]'."
        ) from err

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, FileNotFoundError, ValueError) as err:
        raise RuntimeError(
            f"Failed to load the Hugging Face dataset {spec!r}: {err}. When offline "
            "(HF_DATASETS_OFFLINE=1) only datasets already in the local cache or local folders "
            "load; download it on a machine with network access or pass a local path."
        ) from err
    if text_field not in dataset.column_names:
        raise ValueError(
            f"Hugging Face dataset {spec!r} has no column {text_field!r}; its columns are "
            f"{dataset.column_names}. Pass text_field= with the column that contains the text."
        )

    def open_lines() -> Iterator[str]:
        for batch in dataset.iter(batch_size=1000):
            for value in batch[text_field]:
                yield "" if value is None else str(value)

    return _Source(name=spec, open_lines=open_lines)


def _resolve_tfds(spec: str, text_field: str, data_dir: str | os.PathLike | None) -> _Source:
    match = _TFDS_SPEC.match(spec)
    if match is None:
        raise ValueError(
            f"Invalid TensorFlow Datasets source {spec!r}; expected 'tfds:NAME:SPLIT', for example "
            "'tfds:wikipedia/20230601.en:train'."
        )
    name, split = match.group("name", "split")
    try:
        import tensorflow_datasets as tfds  # Optional dependency.
    except ImportError as err:
        raise RuntimeError(
            f"Reading {spec!r} needs the 'tensorflow-datasets' package, which is not installed; "
            "install it with: pip install 'longflax[data]'."
        ) from err

    # download=False: never reach the network; the data must already be prepared in a
    # random-access format (array_record or parquet), which tfds reads without TensorFlow.
    try:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (ValueError, RuntimeError, OSError, AssertionError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"Failed to open the TensorFlow Datasets source {spec!r}: {first_line}. Prepare it "
            "with file_format='array_record' under tfds_data_dir (or the tfds default folder)."
        ) from err
    if len(data_source) and text_field not in data_source[0]:
        raise ValueError(
            f"TensorFlow Datasets source {spec!r} has no feature {text_field!r}; its features "
            f"are {sorted(data_source[0])}. Pass text_field= with the feature that contains the "
            "text."
        )

    def open_lines() -> Iterator[str]:
        for index in range(len(data_source)):
            value = data_source[index][text_field]
            yield value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return _Source(name=spec, open_lines=open_lines)


def _iterate_documents(sources: list[_Source], layout: str) -> Iterator[str]:
    for source in sources:
        num_documents = 0
        for document in _group_lines(source.open_lines(), layout):
            num_documents += 1
            yield document
        if num_documents == 0:
            raise ValueError(
                f"Source {source.name!r} contains no text (it is empty or only whitespace); "
                "remove it from the sources."
            )


def _is_wikitext_title(line: str) -> bool:
    """Return whether a stripped line is a WikiText article title (`= T =`, not `= = T = =`)."""
    return line.startswith("= ") and line.endswith(" =") and not line.startswith("= =")


def _group_lines(lines: Iterable[str], layout: str) -> Iterator[str]:
    document: list[str] = []
    for raw_line in lines:
        line = raw_line.strip()
        if layout == "lines":
            if line:
                yield line
        elif layout == "paragraphs":
            if line:
                document.append(line)
            elif document:
                yield "\n".join(document)
                document = []
        else:  # wikitext
            if not line:
                continue
            if _is_wikitext_title(line) and document:
                yield "\n".join(document)
                document = []
            document.append(line)
    if document:
        yield "\n".join(document)


# ---------------------------------------------------------------------------------------------
# Token blocks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class TokenBlocks:
    """Fixed-length token blocks cut from a corpus, with per-token text lengths.

    All arrays have shape (num_blocks, block_length). `special_tokens_mask` is 1 at the block
    start and end tokens, the separators between documents, padding, and text tokens whose id is
    a special id (the unknown token, as in Hugging Face's `get_special_tokens_mask`). The inserted
    tokens (start, end, separators, padding) have character and byte counts 0. A text token's
    counts cover the text from the end of the previous token of its document to its own end. So
    whitespace before a token belongs to that token, and so do characters the tokenizer drops
    (such as control characters for BERT). The counts of
    a document's tokens therefore add up to the end offset of its last token, which is the
    document's full length for documents from `read_documents` (they never end in whitespace).
    When a multi-byte character is split over several byte-level tokens, the first of them carries
    the character and all its bytes and the others carry 0.

    Attributes:
        input_ids: Token ids, int32.
        attention_mask: 1 for real tokens, 0 for padding, int32.
        special_tokens_mask: 1 for special tokens and padding, 0 for text tokens, int8.
        char_counts: Characters of text each token covers, int32.
        byte_counts: UTF-8 bytes of text each token covers, int32.
        pad_token_id: Id used for padding (the tokenizer's pad token, else its end token).
        num_documents: Documents read.
        num_stream_tokens: Tokens in the stream, text tokens plus separators between documents.
        num_dropped_tokens: Stream tokens at the end that did not fill a block and were dropped
            (0 when the last partial block was padded instead).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    special_tokens_mask: np.ndarray
    char_counts: np.ndarray
    byte_counts: np.ndarray
    pad_token_id: int
    num_documents: int
    num_stream_tokens: int
    num_dropped_tokens: int

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def block_length(self) -> int:
        """Tokens per block, special tokens included."""
        return int(self.input_ids.shape[1])


@dataclasses.dataclass(frozen=True)
class _SpecialIds:
    start: int
    end: int
    pad: int
    all_special: tuple[int, ...]


def _special_ids(tokenizer: Any) -> _SpecialIds:
    def token_id(name: str) -> int | None:
        return getattr(tokenizer, f"{name}_token_id", None)

    start = token_id("cls") if token_id("cls") is not None else token_id("bos")
    end = token_id("sep") if token_id("sep") is not None else token_id("eos")
    if start is None or end is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} has no start token (cls_token or bos_token) or "
            "no end token (sep_token or eos_token); set them on the tokenizer before building "
            "blocks."
        )
    pad = token_id("pad") if token_id("pad") is not None else end
    return _SpecialIds(
        start=int(start),
        end=int(end),
        pad=int(pad),
        all_special=tuple(sorted(tokenizer.all_special_ids)),
    )


def _backend_tokenizer(tokenizer: Any) -> Any:
    """Return the Rust `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"Tokenizer {type(tokenizer).__name__} is not a Hugging Face fast tokenizer (it has no "
            "backend_tokenizer), so it gives no character offsets; load a fast tokenizer, for "
            "example with AutoTokenizer.from_pretrained(path)."
        )
    return backend


@contextlib.contextmanager
def _plain_text_settings(backend: Any) -> Iterator[None]:
    """Turn off padding, truncation and special-token matching of `backend` while in the block.

    Saved tokenizers may pad or truncate every encoding (BERT checkpoints often pad to 128),
    which would corrupt a document stream, and text such as a literal "</s>" or "<mask>" must
    stay text instead of becoming a special id. The previous settings are restored on exit.
    """
    # NOTE: this changes the caller's tokenizer for the duration of the call, so another thread
    # using the same tokenizer meanwhile gets these settings. A private copy would avoid that but
    # costs about 0.5 s per call for the 50k-token RoBERTa vocabulary (measured on a 2-core CPU).
    padding, truncation = backend.padding, backend.truncation
    encode_special_tokens = backend.encode_special_tokens
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = True
    try:
        yield
    finally:
        if padding is not None:
            backend.enable_padding(**padding)
        if truncation is not None:
            backend.enable_truncation(**truncation)
        backend.encode_special_tokens = encode_special_tokens


@dataclasses.dataclass(frozen=True)
class _TokenStream:
    input_ids: np.ndarray
    special_tokens_mask: np.ndarray
    char_counts: np.ndarray
    byte_counts: np.ndarray
    num_documents: int


def _utf8_positions(text: str) -> np.ndarray:
    """Return the UTF-8 byte offset of every character boundary of `text` (length len+1)."""
    code_points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    positions = np.zeros(len(code_points) + 1, dtype=np.int64)
    np.cumsum(widths, out=positions[1:])
    return positions


def _encode_batch(
    documents: list[str], backend: Any, special: _SpecialIds, *, is_first_batch: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tokenise documents into one stream piece with separators, and per-token text lengths."""
    encodings = backend.encode_batch(documents, add_special_tokens=False)
    lengths = np.array([len(encoding.ids) for encoding in encodings], dtype=np.int64)
    total = int(lengths.sum())
    ids = np.fromiter(
        itertools.chain.from_iterable(encoding.ids for encoding in encodings), np.int64, total
    )
    ends = np.fromiter(
        (end for encoding in encodings for _, end in encoding.offsets), np.int64, total
    )

    # Work in character positions of the concatenated batch text, so one running maximum covers
    # all documents: each token covers the text from the furthest end seen so far to its own end.
    doc_char_starts = np.zeros(len(documents), dtype=np.int64)
    np.cumsum([len(document) for document in documents[:-1]], out=doc_char_starts[1:])
    doc_token_starts = np.zeros(len(documents), dtype=np.int64)
    np.cumsum(lengths[:-1], out=doc_token_starts[1:])
    token_doc = np.repeat(np.arange(len(documents)), lengths)
    covered_end = np.maximum.accumulate(ends + doc_char_starts[token_doc]) if total else ends
    covered_start = np.empty_like(covered_end)
    covered_start[1:] = covered_end[:-1]
    has_tokens = lengths > 0
    covered_start[doc_token_starts[has_tokens]] = doc_char_starts[has_tokens]

    byte_positions = _utf8_positions("".join(documents))
    char_counts = covered_end - covered_start
    byte_counts = byte_positions[covered_end] - byte_positions[covered_start]
    is_special = np.isin(ids, special.all_special)

    # One separator before every document except the first of the whole stream.
    separator_at = doc_token_starts if not is_first_batch else doc_token_starts[1:]
    ids = np.insert(ids, separator_at, special.end)
    is_special = np.insert(is_special, separator_at, True)
    char_counts = np.insert(char_counts, separator_at, 0)
    byte_counts = np.insert(byte_counts, separator_at, 0)
    return ids, is_special, char_counts, byte_counts


def _tokenize_stream(
    documents: Iterable[str],
    backend: Any,
    special: _SpecialIds,
    *,
    batch_size: int,
    show_progress: bool,
) -> _TokenStream:
    pieces: list[tuple[np.ndarray, ...]] = []
    num_documents = 0
    iterator = iter(documents)
    # disable=None turns the bar off when stderr is not a terminal.
    with tqdm.tqdm(desc="Tokenizing", unit="doc", disable=None if show_progress else True) as bar:
        while batch := list(itertools.islice(iterator, batch_size)):
            pieces.append(_encode_batch(batch, backend, special, is_first_batch=num_documents == 0))
            num_documents += len(batch)
            bar.update(len(batch))

    if not pieces:
        raise ValueError("build_blocks got no documents; check the sources passed to it.")
    ids, is_special, char_counts, byte_counts = (
        np.concatenate(arrays) for arrays in zip(*pieces, strict=True)
    )
    return _TokenStream(
        input_ids=ids.astype(np.int32),
        special_tokens_mask=is_special.astype(np.int8),
        char_counts=char_counts.astype(np.int32),
        byte_counts=byte_counts.astype(np.int32),
        num_documents=num_documents,
    )


def _cut_blocks(
    stream: _TokenStream, block_length: int, special: _SpecialIds, *, pad_last_block: bool
) -> TokenBlocks:
    body_length = block_length - 2
    num_tokens = len(stream.input_ids)
    num_full = num_tokens // body_length
    remainder = num_tokens - num_full * body_length
    num_blocks = num_full + (1 if pad_last_block and remainder else 0)
    if num_blocks == 0:
        raise ValueError(
            f"The documents give {num_tokens} tokens, fewer than the {body_length} "
            f"(block_length - 2) needed for one block of {block_length}; add text, lower "
            "block_length or pass pad_last_block=True."
        )

    # Each array is laid out as [start, body..., end, padding...] per block.
    def layout(values: np.ndarray, start: int, end: int, pad: int, dtype: Any) -> np.ndarray:
        out = np.full((num_blocks, block_length), pad, dtype=dtype)
        out[:, 0] = start
        out[:num_full, 1 : body_length + 1] = values[: num_full * body_length].reshape(
            num_full, body_length
        )
        out[:num_full, body_length + 1] = end
        if num_blocks > num_full:
            out[num_full, 1 : remainder + 1] = values[num_full * body_length :]
            out[num_full, remainder + 1] = end
        return out

    attention_mask = np.zeros((num_blocks, block_length), dtype=np.int32)
    attention_mask[:num_full] = 1
    if num_blocks > num_full:
        attention_mask[num_full, : remainder + 2] = 1
    return TokenBlocks(
        input_ids=layout(stream.input_ids, special.start, special.end, special.pad, np.int32),
        attention_mask=attention_mask,
        special_tokens_mask=layout(stream.special_tokens_mask, 1, 1, 1, np.int8),
        char_counts=layout(stream.char_counts, 0, 0, 0, np.int32),
        byte_counts=layout(stream.byte_counts, 0, 0, 0, np.int32),
        pad_token_id=special.pad,
        num_documents=stream.num_documents,
        num_stream_tokens=num_tokens,
        num_dropped_tokens=0 if pad_last_block else remainder,
    )


def _cache_key(
    documents: list[str],
    tokenizer_json: str,
    special: _SpecialIds,
    block_length: int,
    pad_last_block: bool,
) -> str:
    text_hash = hashlib.sha256()
    for document in documents:
        encoded = document.encode("utf-8", "surrogatepass")
        text_hash.update(len(encoded).to_bytes(8, "little"))
        text_hash.update(encoded)
    fields = {
        "format": _CACHE_FORMAT_VERSION,
        "documents": text_hash.hexdigest(),
        "tokenizer": hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest(),
        "special": dataclasses.asdict(special),
        "block_length": block_length,
        "pad_last_block": pad_last_block,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()[:32]


_ARRAY_FIELDS = ("input_ids", "attention_mask", "special_tokens_mask", "char_counts", "byte_counts")
_SCALAR_FIELDS = ("pad_token_id", "num_documents", "num_stream_tokens", "num_dropped_tokens")


def _save_cache(path: pathlib.Path, blocks: TokenBlocks) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: getattr(blocks, name) for name in _ARRAY_FIELDS}
    arrays.update({name: np.asarray(getattr(blocks, name)) for name in _SCALAR_FIELDS})
    # Write to a temporary file and rename, so a crash never leaves a half-written cache file.
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        np.savez(handle, **arrays)
    os.replace(handle.name, path)


def _load_cache(path: pathlib.Path) -> TokenBlocks | None:
    try:
        with np.load(path) as stored:
            fields: dict[str, Any] = {name: stored[name] for name in _ARRAY_FIELDS}
            fields.update({name: int(stored[name]) for name in _SCALAR_FIELDS})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logging.warning("Ignoring unreadable token-block cache %s (%s); rebuilding it.", path, err)
        return None
    return TokenBlocks(**fields)


def build_blocks(
    documents: Iterable[str],
    tokenizer: Any,
    block_length: int,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 1000,
    show_progress: bool = True,
    pad_last_block: bool = False,
) -> TokenBlocks:
    """Tokenise documents into one stream and cut it into blocks of `block_length` tokens.

    Documents are joined with the tokenizer's end token (`sep_token`, else `eos_token`) between
    them. The stream is cut into contiguous pieces of `block_length - 2` tokens, and each piece
    becomes `start + piece + end`, with the start token `cls_token` (else `bos_token`). A block
    may therefore hold the end of one document and the start of the next. By default the last
    partial piece is dropped and counted in `num_dropped_tokens`; with `pad_last_block=True` it
    becomes a final block `start + piece + end + padding`.

    The tokenizer's own padding and truncation settings are ignored, and text that spells a
    special token (a literal `</s>`) is tokenised as ordinary text.

    With `cache_dir`, the blocks are stored as `.npz` under a key hashed from the documents' text,
    the tokenizer's serialised JSON, its special token ids, `block_length` and `pad_last_block`.
    A later call with the same inputs loads that file instead of tokenising. Documents are then
    read into memory first, because the key needs all of them.

    Args:
        documents: Document texts, for example from `read_documents`.
        tokenizer: A Hugging Face fast tokenizer (`PreTrainedTokenizerFast` or a class backed by
            the `tokenizers` library).
        block_length: Tokens per block including the start and end token; at least 3.
        cache_dir: Folder for the cache file, created when missing; None disables caching.
        batch_size: Documents tokenised per call of the Rust tokenizer.
        show_progress: Whether to show a tqdm progress bar (only when stderr is a terminal).
        pad_last_block: Whether to keep the last partial block, padded, instead of dropping it.

    Returns:
        The blocks, with per-token character and byte counts.

    Raises:
        ValueError: If `block_length` or `batch_size` is invalid, the tokenizer is not a fast
            tokenizer or lacks start/end tokens, there are no documents, or the text is too short
            for one block.
    """
    if not isinstance(block_length, int) or block_length < 3:
        raise ValueError(
            f"block_length must be an integer of at least 3 (start token, one text token, end "
            f"token); got {block_length!r}."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    backend = _backend_tokenizer(tokenizer)
    special = _special_ids(tokenizer)

    cache_path = None
    if cache_dir is not None:
        documents = list(documents)
        key = _cache_key(documents, backend.to_str(), special, block_length, pad_last_block)
        cache_path = pathlib.Path(cache_dir) / f"blocks-{key}.npz"
        if cache_path.exists():
            blocks = _load_cache(cache_path)
            if blocks is not None:
                logging.info("Loaded %d token blocks from cache %s.", len(blocks), cache_path)
                return blocks

    with _plain_text_settings(backend):
        stream = _tokenize_stream(
            documents, backend, special, batch_size=batch_size, show_progress=show_progress
        )
    blocks = _cut_blocks(stream, block_length, special, pad_last_block=pad_last_block)
    logging.info(
        "Built %d blocks of %d tokens from %d documents (%d stream tokens, %d dropped at the end).",
        len(blocks),
        block_length,
        blocks.num_documents,
        blocks.num_stream_tokens,
        blocks.num_dropped_tokens,
    )
    if cache_path is not None:
        _save_cache(cache_path, blocks)
        logging.info("Wrote token-block cache %s.", cache_path)
    return blocks


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockBatch:
    """A batch of blocks; every array has shape (batch_size, block_length) except `block_indices`.

    Attributes:
        input_ids: Token ids, int32.
        attention_mask: 1 for real tokens, 0 for padding, int32.
        special_tokens_mask: 1 for special tokens and padding, int8.
        char_counts: Characters of text each token covers, int32.
        byte_counts: UTF-8 bytes of text each token covers, int32.
        block_indices: (batch_size,) index of each row's block in the `TokenBlocks`, -1 for filler
            rows (all padding) that complete the last batch when `drop_remainder=False`.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    special_tokens_mask: np.ndarray
    char_counts: np.ndarray
    byte_counts: np.ndarray
    block_indices: np.ndarray


class BlockIterator:
    """Iterates over fixed-shape batches of blocks in a seeded, resumable order.

    Epoch `e` visits the blocks in the order `np.random.default_rng([seed, e]).permutation(n)`
    (or in storage order without shuffling), so the order depends only on the seed and the epoch.
    A batch never spans two epochs. `state()` returns the position as a JSON-serialisable dict and
    `restore()` moves any iterator built from the same blocks and settings to that position.

    Args:
        blocks: The blocks to serve.
        batch_size: Rows per batch.
        seed: Non-negative seed of the shuffle order.
        shuffle: Whether to shuffle the blocks each epoch.
        drop_remainder: Whether to drop the blocks that do not fill the last batch of an epoch.
            If False, the last batch is completed with filler rows of padding, which have no
            maskable tokens and so carry no weight in the masked-LM loss.
        num_epochs: Epochs to serve before stopping; None serves batches forever.

    Raises:
        ValueError: If `batch_size`, `seed` or `num_epochs` is invalid, or `drop_remainder` is
            True and there are fewer blocks than `batch_size`.
    """

    def __init__(
        self,
        blocks: TokenBlocks,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer; got {seed!r}.")
        if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
            raise ValueError(f"num_epochs must be a positive integer or None; got {num_epochs!r}.")
        if drop_remainder and batch_size > len(blocks):
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(blocks)} blocks, so every batch would "
                "be dropped; lower batch_size, add text or pass drop_remainder=False."
            )
        self._blocks = blocks
        self._batch_size = batch_size
        self._seed = seed
        self._shuffle = shuffle
        self._drop_remainder = drop_remainder
        self._num_epochs = num_epochs
        if drop_remainder:
            self._batches_per_epoch = len(blocks) // batch_size
        else:
            self._batches_per_epoch = math.ceil(len(blocks) / batch_size)
        self._epoch = 0
        self._batch_in_epoch = 0
        self._order_epoch = -1
        self._order = np.arange(0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches served per epoch."""
        return self._batches_per_epoch

    def __iter__(self) -> BlockIterator:
        return self

    def __next__(self) -> BlockBatch:
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        order = self._epoch_order(self._epoch)
        first = self._batch_in_epoch * self._batch_size
        indices = order[first : first + self._batch_size]
        self._batch_in_epoch += 1
        if self._batch_in_epoch == self._batches_per_epoch:
            self._epoch += 1
            self._batch_in_epoch = 0
        return self._gather(indices)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self._shuffle:
                self._order = np.random.default_rng([self._seed, epoch]).permutation(
                    len(self._blocks)
                )
            else:
                self._order = np.arange(len(self._blocks))
            self._order_epoch = epoch
        return self._order

    def _gather(self, indices: np.ndarray) -> BlockBatch:
        num_filler = self._batch_size - len(indices)
        blocks = self._blocks

        def rows(values: np.ndarray, fill: int) -> np.ndarray:
            taken = values[indices]
            if num_filler == 0:
                return taken
            filler = np.full((num_filler, values.shape[1]), fill, dtype=values.dtype)
            return np.concatenate([taken, filler])

        block_indices = np.concatenate([indices, np.full(num_filler, -1)]).astype(np.int64)
        return BlockBatch(
            input_ids=rows(blocks.input_ids, blocks.pad_token_id),
            attention_mask=rows(blocks.attention_mask, 0),
            special_tokens_mask=rows(blocks.special_tokens_mask, 1),
            char_counts=rows(blocks.char_counts, 0),
            byte_counts=rows(blocks.byte_counts, 0),
            block_indices=block_indices,
        )

    def state(self) -> dict[str, Any]:
        """Return the position and settings as a JSON-serialisable dict."""
        return {
            "epoch": self._epoch,
            "batch_in_epoch": self._batch_in_epoch,
            "seed": self._seed,
            "num_blocks": len(self._blocks),
            "batch_size": self._batch_size,
            "shuffle": self._shuffle,
            "drop_remainder": self._drop_remainder,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Move to the position stored by `state()`.

        Args:
            state: A dict returned by `state()` of an iterator with the same blocks and settings.

        Raises:
            ValueError: If a key is missing, a setting differs from this iterator's, or the
                position is out of range.
        """
        current = self.state()
        missing = sorted(set(current) - set(state))
        if missing:
            raise ValueError(
                f"Iterator state is missing the keys {missing}; pass a dict returned by "
                "BlockIterator.state()."
            )
        for key in ("seed", "num_blocks", "batch_size", "shuffle", "drop_remainder"):
            if state[key] != current[key]:
                raise ValueError(
                    f"Iterator state has {key}={state[key]!r} but this iterator has "
                    f"{key}={current[key]!r}; build the iterator with the same blocks and "
                    "settings as the one that saved the state."
                )
        epoch, batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        if not 0 <= batch_in_epoch < self._batches_per_epoch or epoch < 0:
            raise ValueError(
                f"Iterator state position epoch={epoch}, batch_in_epoch={batch_in_epoch} is out "
                f"of range (0 <= batch_in_epoch < {self._batches_per_epoch}, epoch >= 0)."
            )
        self._epoch = int(epoch)
        self._batch_in_epoch = int(batch_in_epoch)
