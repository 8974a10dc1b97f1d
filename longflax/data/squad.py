"""SQuAD-format question answering data: one in-memory representation, loading and saving.

Every QA data set in longflax (SQuAD v1.1, XQuAD, MLQA, TyDi QA GoldP and the concatenated
long-context sets) is held as a list of `QAExample`. Contexts are kept byte for byte as read,
because `Answer.start` is a character offset into the context: stripping or normalising the
text would move every answer after the change.

Sources accepted by `load_squad`:

* a SQuAD JSON file (`.json` or `.json.gz`), v1.1 or v2 (unanswerable questions are skipped
  and counted), with or without the top-level `version` key;
* `hf:NAME[:CONFIG]:SPLIT`, read with Hugging Face `datasets` (optional dependency);
* `tfds:NAME:SPLIT`, read with tensorflow-datasets (optional dependency, no TensorFlow needed).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

from absl import logging

__all__ = [
    "Answer",
    "LoadReport",
    "QAExample",
    "find_misaligned_answers",
    "load_squad",
    "load_squad_with_report",
    "resolve_data_file",
    "save_squad",
]

# Keys of a SQuAD qa entry that map onto `QAExample` fields. Every other key of a qa entry is
# kept in `QAExample.metadata` and written back by `save_squad`.
_QA_KEYS = frozenset({"id", "question", "answers", "is_impossible", "plausible_answers"})

# Problems that make a question invalid, in the order they are reported.
MISSING_FIELD = "missing or invalid field"
MISALIGNED_ANSWER = "answer_start does not point at the answer text"
DUPLICATE_ID = "duplicate question id"
_PROBLEMS = (MISSING_FIELD, MISALIGNED_ANSWER, DUPLICATE_ID)

# Number of example ids shown per problem in error messages and logs.
_IDS_SHOWN = 5


@dataclasses.dataclass(frozen=True)
class Answer:
    """One gold answer span.

    Attributes:
        text: The answer text, exactly as it occurs in the context.
        start: Character offset of the answer in the context, so that
            `context[start:start + len(text)] == text`.
    """

    text: str
    start: int


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One extractive question with its context and gold answers.

    Attributes:
        id: Question id, unique within a data set.
        title: Title of the article the context comes from ('' when unknown).
        context: The context text, unmodified.
        question: The question text.
        answers: Gold answers; at least one for every loaded example.
        metadata: Extra per-question fields, for example `gold_position` and `num_contexts`
            (written by the concatenation builder) or `language`. Values must be JSON
            serialisable to be saved.
    """

    id: str
    title: str
    context: str
    question: str
    answers: tuple[Answer, ...]
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LoadReport:
    """Counts collected while loading a SQuAD-format source.

    Attributes:
        source: The source as given to the loader.
        num_questions: Questions read, including skipped ones (up to `limit`, if one was given).
        num_loaded: Examples returned.
        num_unanswerable: SQuAD v2 questions marked `is_impossible`, skipped.
        problems: Number of invalid questions per problem (empty when all are valid).
        problem_ids: The first few ids of the invalid questions per problem.
    """

    source: str
    num_questions: int = 0
    num_loaded: int = 0
    num_unanswerable: int = 0
    problems: dict[str, int] = dataclasses.field(default_factory=dict)
    problem_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def num_invalid(self) -> int:
        """Number of questions rejected for any problem."""
        return sum(self.problems.values())

    def add_problem(self, problem: str, example_id: str) -> None:
        """Count one invalid question under `problem`, remembering the first few ids."""
        self.problems[problem] = self.problems.get(problem, 0) + 1
        ids = self.problem_ids.setdefault(problem, [])
        if len(ids) < _IDS_SHOWN:
            ids.append(example_id)

    def describe_problems(self) -> str:
        """Return one line per problem with its count and first ids."""
        parts = []
        for problem in _PROBLEMS:
            if problem in self.problems:
                ids = ", ".join(repr(i) for i in self.problem_ids[problem])
                parts.append(f"{problem}: {self.problems[problem]} (first ids: {ids})")
        return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Loading


def load_squad(
    source: str | os.PathLike[str],
    *,
    on_invalid: Literal["error", "skip"] = "error",
    limit: int | None = None,
    check_offsets: bool = True,
) -> list[QAExample]:
    """Load SQuAD-format examples from a file or a dataset hub.

    See `load_squad_with_report` for the arguments and errors; this function drops the report.

    Returns:
        The valid answerable examples, in source order.
    """
    examples, _ = load_squad_with_report(
        source, on_invalid=on_invalid, limit=limit, check_offsets=check_offsets
    )
    return examples


def load_squad_with_report(
    source: str | os.PathLike[str],
    *,
    on_invalid: Literal["error", "skip"] = "error",
    limit: int | None = None,
    check_offsets: bool = True,
) -> tuple[list[QAExample], LoadReport]:
    """Load SQuAD-format examples and report what was skipped.

    A question is invalid when a required field is missing or has the wrong type, or when it
    has no answer without being marked `is_impossible`. It is also invalid when an answer's
    `answer_start` does not point at its text, or when its id repeats an earlier one. SQuAD v2
    questions marked `is_impossible` are not invalid: they are skipped and counted in
    `num_unanswerable`.

    Args:
        source: Path of a `.json` or `.json.gz` SQuAD file, `data:RELATIVE/PATH` for a file
            under $LONGFLAX_DATA_DIR (see `resolve_data_file`), `hf:NAME[:CONFIG]:SPLIT` for a
            Hugging Face dataset, or `tfds:NAME:SPLIT` for a TensorFlow Datasets dataset.
        on_invalid: "error" raises on the first load that finds invalid questions; "skip"
            drops them and logs their counts.
        limit: Stop after this many valid examples (all when None).
        check_offsets: Whether to check `answer_start` against the answer text. Scoring uses
            only answer texts, so evaluation may pass False to score files whose offsets are
            known to be wrong.

    Returns:
        The valid answerable examples in source order, and the load report.

    Raises:
        ValueError: If the arguments are invalid, the file is missing or not SQuAD JSON, or
            `on_invalid` is "error" and some questions are invalid.
        RuntimeError: If an optional dataset library is missing or cannot load the dataset.
    """
    if on_invalid not in ("error", "skip"):
        raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples or None, got {limit}.")

    source_name = os.fspath(source)
    if source_name.startswith("hf:"):
        raw = _iter_hf_rows(source_name)
    elif source_name.startswith("tfds:"):
        raw = _iter_tfds_rows(source_name)
    elif source_name.startswith("data:"):
        raw = _iter_file_rows(resolve_data_file(source_name[len("data:") :]))
    else:
        raw = _iter_file_rows(pathlib.Path(source_name))

    report = LoadReport(source=source_name)
    examples = _validate_rows(raw, report, check_offsets=check_offsets, limit=limit)

    if report.num_invalid and on_invalid == "error":
        raise ValueError(
            f"{source_name}: {report.num_invalid} of {report.num_questions} questions are "
            f"invalid. {report.describe_problems()}. Fix the data, or pass on_invalid='skip' "
            "to drop these questions."
        )
    if report.num_invalid:
        logging.warning(
            "%s: skipped %d of %d invalid questions. %s",
            source_name,
            report.num_invalid,
            report.num_questions,
            report.describe_problems(),
        )
    if report.num_unanswerable:
        logging.info(
            "%s: skipped %d unanswerable (is_impossible) questions.",
            source_name,
            report.num_unanswerable,
        )
    logging.info("%s: loaded %d examples.", source_name, report.num_loaded)
    return examples, report


@dataclasses.dataclass
class _RawQuestion:
    """One question as read from a source, before validation."""

    title: Any
    context: Any
    entry: Mapping[str, Any]


def _validate_rows(
    rows: Iterable[_RawQuestion],
    report: LoadReport,
    *,
    check_offsets: bool,
    limit: int | None,
) -> list[QAExample]:
    """Turn raw questions into examples, counting every invalid or unanswerable one."""
    examples: list[QAExample] = []
    seen_ids: set[str] = set()
    for row in rows:
        if limit is not None and len(examples) >= limit:
            break
        report.num_questions += 1
        entry = row.entry if isinstance(row.entry, Mapping) else {}
        example_id = entry.get("id")
        shown_id = (
            str(example_id) if example_id is not None else f"<question {report.num_questions}>"
        )

        if entry.get("is_impossible") is True:
            report.num_unanswerable += 1
            continue

        answers = _parse_answers(entry.get("answers"))
        fields_ok = (
            isinstance(example_id, str)
            and isinstance(entry.get("question"), str)
            and isinstance(row.context, str)
            and isinstance(row.title, str)
            and answers is not None
        )
        if not fields_ok:
            report.add_problem(MISSING_FIELD, shown_id)
            continue
        if check_offsets and any(not _is_aligned(row.context, a) for a in answers):
            report.add_problem(MISALIGNED_ANSWER, shown_id)
            continue
        if example_id in seen_ids:
            report.add_problem(DUPLICATE_ID, shown_id)
            continue

        seen_ids.add(example_id)
        metadata = {key: value for key, value in entry.items() if key not in _QA_KEYS}
        examples.append(
            QAExample(
                id=example_id,
                title=row.title,
                context=row.context,
                question=entry["question"],
                answers=answers,
                metadata=metadata,
            )
        )
    report.num_loaded = len(examples)
    return examples


def _is_aligned(context: str, answer: Answer) -> bool:
    """Return whether the answer's start offset points at its text in the context."""
    end = answer.start + len(answer.text)
    return answer.start >= 0 and context[answer.start : end] == answer.text


def _short_error(exc: BaseException) -> str:
    """Return the first line of an exception message, cut to 300 characters."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return lines[0][:300]


def _parse_answers(raw_answers: Any) -> tuple[Answer, ...] | None:
    """Return the answers of a qa entry, or None when they are missing or malformed."""
    if not isinstance(raw_answers, list) or not raw_answers:
        return None
    answers = []
    for raw in raw_answers:
        if not isinstance(raw, Mapping):
            return None
        text = raw.get("text")
        start = raw.get("answer_start")
        # bool is a subclass of int, but True is never a meaningful offset.
        if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
            return None
        answers.append(Answer(text=text, start=start))
    return tuple(answers)


def _read_json(path: pathlib.Path) -> Any:
    """Read a JSON file, decompressing it when the name ends in .gz."""
    if not path.is_file():
        raise ValueError(
            f"Data file not found: {path}. Pass the path of an existing SQuAD JSON file, or a "
            "data: path such as data:squad/dev-v1.1.json to read it from $LONGFLAX_DATA_DIR."
        )
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise ValueError(
            f"{path} is not valid UTF-8 JSON ({exc}). Pass a SQuAD JSON file (.json or .json.gz)."
        ) from exc


def _iter_file_rows(path: pathlib.Path) -> Iterator[_RawQuestion]:
    """Yield the questions of a SQuAD JSON file in file order."""
    document = _read_json(path)
    articles = document.get("data") if isinstance(document, dict) else None
    if not isinstance(articles, list):
        raise ValueError(
            f"{path} is not in SQuAD format: expected a JSON object with a 'data' list of "
            "articles, each with 'paragraphs' holding 'context' and 'qas'."
        )
    for article in articles:
        if not isinstance(article, Mapping) or not isinstance(article.get("paragraphs"), list):
            raise ValueError(f"{path} is not in SQuAD format: an article has no 'paragraphs' list.")
        # Some files (for example MLQA regrouped from Hugging Face) have no article titles.
        title = article.get("title") or ""
        for paragraph in article["paragraphs"]:
            qas = paragraph.get("qas") if isinstance(paragraph, Mapping) else None
            if not isinstance(qas, list):
                raise ValueError(f"{path} is not in SQuAD format: a paragraph has no 'qas' list.")
            context = paragraph.get("context")
            for entry in qas:
                yield _RawQuestion(title=title, context=context, entry=entry)


def _flat_row_to_raw(row: Mapping[str, Any]) -> _RawQuestion:
    """Convert one flat row (the Hugging Face / TFDS SQuAD layout) to a raw question.

    The flat layout stores answers as {"text": [...], "answer_start": [...]}.
    """

    def decode(value: Any) -> Any:
        return value.decode("utf-8") if isinstance(value, bytes) else value

    raw_answers = row.get("answers")
    answers: Any = None
    if isinstance(raw_answers, Mapping):
        texts = [decode(t) for t in raw_answers.get("text", [])]
        starts = [int(s) for s in raw_answers.get("answer_start", [])]
        if len(texts) == len(starts):
            answers = [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    entry = {
        key: decode(value)
        for key, value in row.items()
        if key not in ("answers", "context", "title")
    }
    entry["answers"] = answers
    if entry.get("is_impossible") is None and answers == []:
        # SQuAD v2 on the hubs marks unanswerable questions by an empty answer list only.
        entry["is_impossible"] = True
    return _RawQuestion(
        title=decode(row.get("title")) or "", context=decode(row.get("context")), entry=entry
    )


def _split_hub_source(source: str, prefix: str, *, allow_config: bool) -> list[str]:
    """Split `prefix:NAME[:CONFIG]:SPLIT` into its parts."""
    parts = source[len(prefix) :].split(":")
    valid_lengths = (2, 3) if allow_config else (2,)
    form = f"{prefix}NAME[:CONFIG]:SPLIT" if allow_config else f"{prefix}NAME:SPLIT"
    if len(parts) not in valid_lengths or not all(parts):
        raise ValueError(f"Invalid data source {source!r}: expected the form {form}.")
    return parts


def _iter_hf_rows(source: str) -> Iterator[_RawQuestion]:
    """Yield the questions of a Hugging Face dataset given as hf:NAME[:CONFIG]:SPLIT."""
    parts = _split_hub_source(source, "hf:", allow_config=True)
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        import datasets  # Optional dependency, imported on use.
    except ImportError as exc:
        raise RuntimeError(
            f"Reading {source!r} needs the Hugging Face 'datasets' package, which is not "
            "installed. Install it with: pip install 'longflax[data]'."
        ) from exc
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except (ConnectionError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"Could not load {source!r} with Hugging Face datasets: {_short_error(exc)}. "
            "Without network access the dataset must already be in the Hugging Face cache. "
            "Otherwise pass a local SQuAD JSON file."
        ) from exc
    for row in rows:
        yield _flat_row_to_raw(row)


def _iter_tfds_rows(source: str) -> Iterator[_RawQuestion]:
    """Yield the questions of a TensorFlow Datasets dataset given as tfds:NAME:SPLIT."""
    name, split = _split_hub_source(source, "tfds:", allow_config=False)
    try:
        import tensorflow_datasets as tfds  # Optional dependency, imported on use.
    except ImportError as exc:
        raise RuntimeError(
            f"Reading {source!r} needs the 'tensorflow-datasets' package, which is not "
            "installed. Install it with: pip install 'longflax[data]'."
        ) from exc
    try:
        # data_source gives random access to prepared data without importing TensorFlow.
        rows = tfds.data_source(name, split=split, download=False)
    except (ConnectionError, OSError, ValueError, KeyError) as exc:
        raise RuntimeError(
            f"Could not load {source!r} with tensorflow-datasets: {_short_error(exc)}. "
            "The dataset must already be prepared in the TFDS data folder ($TFDS_DATA_DIR). "
            "Otherwise pass a local SQuAD JSON file."
        ) from exc
    for row in rows:
        yield _flat_row_to_raw(row)


def find_misaligned_answers(examples: Iterable[QAExample]) -> list[tuple[str, Answer]]:
    """Find answers whose start offset does not point at their text.

    Args:
        examples: Examples to check.

    Returns:
        (example id, answer) for every answer where
        `context[start:start + len(text)] != text`, in example order.
    """
    return [
        (example.id, answer)
        for example in examples
        for answer in example.answers
        if not _is_aligned(example.context, answer)
    ]


# --------------------------------------------------------------------------------------------
# Saving


def save_squad(examples: Sequence[QAExample], path: str | os.PathLike[str]) -> None:
    """Write examples as a SQuAD v1.1 JSON file, gzipped when the name ends in .gz.

    Consecutive examples with the same title form one article, and consecutive examples of an
    article with the same context form one paragraph, so loading the file returns the examples
    in the same order. Metadata fields are written into each qa entry.

    Args:
        examples: Examples to write.
        path: Output file; parent folders are created. The file is replaced atomically.

    Raises:
        ValueError: If a metadata key collides with a standard qa key, or a metadata value is
            not JSON serialisable.
    """
    articles: list[dict[str, Any]] = []
    for example in examples:
        clashes = sorted(set(example.metadata) & _QA_KEYS)
        if clashes:
            raise ValueError(
                f"Example {example.id!r} has metadata keys {clashes} that are standard SQuAD "
                "qa keys. Rename these metadata fields before saving."
            )
        if not articles or articles[-1]["title"] != example.title:
            articles.append({"title": example.title, "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != example.context:
            paragraphs.append({"context": example.context, "qas": []})
        paragraphs[-1]["qas"].append(
            {
                "id": example.id,
                "question": example.question,
                "answers": [{"text": a.text, "answer_start": a.start} for a in example.answers],
                **example.metadata,
            }
        )

    try:
        text = json.dumps({"version": "1.1", "data": articles}, ensure_ascii=False)
    except TypeError as exc:
        raise ValueError(
            f"Cannot write {os.fspath(path)}: a metadata value is not JSON serialisable ({exc}). "
            "Store metadata as strings, numbers, booleans, lists or dicts."
        ) from exc

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so a crash never leaves a truncated file behind.
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        tmp_path = pathlib.Path(f.name)
    try:
        if path.name.endswith(".gz"):
            with gzip.open(tmp_path, "wt", encoding="utf-8", compresslevel=6) as f:
                f.write(text)
        else:
            tmp_path.write_text(text, encoding="utf-8")
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Finding and downloading data files

DATA_DIR_ENV = "LONGFLAX_DATA_DIR"
CACHE_DIR_ENV = "LONGFLAX_CACHE_DIR"
OFFLINE_ENV = "LONGFLAX_OFFLINE"

_XQUAD_LANGUAGES = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
_MLQA_LANGUAGES = ("ar", "de", "en", "es", "hi", "vi", "zh")
_MLQA_ZIP_URL = "https://dl.fbaipublicfiles.com/MLQA/MLQA_V1.zip"

# SHA-256 of the uncompressed official files, where known. The XQuAD and SQuAD dev values were
# computed from unmodified copies of the official files.
_KNOWN_SHA256 = {
    "squad/dev-v1.1.json": "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9",
    "squad/train-v1.1.json": "3527663986b8295af4f7fcdff1ba1ff3f72d07d61a20f487cb238a6ef92fd955",
    "xquad/xquad.ar.json": "abdabd7afed5c635d99cca0f3f0d0c9d9ed0bc77451e963c2e4e0638c29e486d",
    "xquad/xquad.de.json": "990b5d746746ed65ed4702ea5f35f99ffa4e2f1c390c07d003642acd937916f9",
    "xquad/xquad.el.json": "821cf0f88e73fa258fd2f548b19b6ec39f7025059e16f6f9fc8cd797c9c3663e",
    "xquad/xquad.en.json": "e4c57d1c9143aaa1c5d265ba5987a65f4e69528d2a98f29d6e75019b10344f29",
    "xquad/xquad.es.json": "dcbae93ec3a9f4b9e78fd834a171d6f96c1a875e10e15b7530b7e4ef4971e37e",
    "xquad/xquad.hi.json": "df2cce3532b37e9beb8979704b5c9a4bf874358f105395a298b89427b43b9d24",
    "xquad/xquad.ro.json": "94f8d54e93ad2b7dd2e76dd921a666b5b8eff2d4379df9f179c42b445f09643f",
    "xquad/xquad.ru.json": "208d5b1aa154c52b1b5c5eda16281e455e8fd198cdb9af3f469f0d6037d973bf",
    "xquad/xquad.th.json": "5cdda11d0e1e075f7872abf4e6ae830388ce7f617964d542308e9ae4257e0f43",
    "xquad/xquad.tr.json": "92179a564774b7696100d144c1e10870d0a966b6fccbdd254a65b9d2ab1971cc",
    "xquad/xquad.vi.json": "f619a1eb11fb42d3ab0834259e488a65f585447ef6154437bfb7199d85161a04",
    "xquad/xquad.zh.json": "691d0b3359bc6b8faa8de931dfdfe21d50a65861ae348e32a0d1a0190b0c8835",
    "mlqa/dev-context-de-question-de.json": (
        "c60546f273b3951da2e1fcad1f078d9d422f02b0a49e31fdeca41f6bd48e4b2e"
    ),
}


@dataclasses.dataclass(frozen=True)
class _DownloadSource:
    """Where an official data file comes from: a URL, and the member name if it is a zip."""

    url: str
    zip_member: str | None = None


def _official_sources() -> dict[str, _DownloadSource]:
    """Map data-folder paths (without .gz) to their official download source."""
    sources = {
        "squad/dev-v1.1.json": _DownloadSource(
            "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
        ),
        "squad/train-v1.1.json": _DownloadSource(
            "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json"
        ),
        "tydiqa-goldp/tydiqa-goldp-v1.1-dev.json": _DownloadSource(
            "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-dev.json"
        ),
        "tydiqa-goldp/tydiqa-goldp-v1.1-train.json": _DownloadSource(
            "https://storage.googleapis.com/tydiqa/v1.1/tydiqa-goldp-v1.1-train.json"
        ),
    }
    for language in _XQUAD_LANGUAGES:
        # The deepmind/xquad repository now lives under the google-deepmind organisation.
        sources[f"xquad/xquad.{language}.json"] = _DownloadSource(
            f"https://raw.githubusercontent.com/google-deepmind/xquad/master/xquad.{language}.json"
        )
    for split in ("dev", "test"):
        for context_language in _MLQA_LANGUAGES:
            for question_language in _MLQA_LANGUAGES:
                name = f"{split}-context-{context_language}-question-{question_language}.json"
                sources[f"mlqa/{name}"] = _DownloadSource(
                    _MLQA_ZIP_URL, zip_member=f"MLQA_V1/{split}/{name}"
                )
    return sources


def _candidates(relative_path: str) -> list[str]:
    """Return the relative path with and without the .gz suffix, the given form first."""
    if relative_path.endswith(".gz"):
        return [relative_path, relative_path[: -len(".gz")]]
    return [relative_path, relative_path + ".gz"]


def _cache_dir() -> pathlib.Path:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return pathlib.Path(configured)
    return pathlib.Path.home() / ".cache" / "longflax"


def resolve_data_file(relative_path: str, *, download_url: str | None = None) -> pathlib.Path:
    """Find a data file locally, or download it from its official source.

    The file is looked up, with and without a `.gz` suffix, first under `$LONGFLAX_DATA_DIR`
    (a folder laid out like `squad/dev-v1.1.json.gz`, `xquad/xquad.de.json`, ...), then in the
    download cache (`$LONGFLAX_CACHE_DIR`, default `~/.cache/longflax`). Otherwise files with an
    official source are downloaded into the cache: SQuAD v1.1 dev and train, XQuAD, TyDi QA
    GoldP v1.1 dev and train (all languages in one file) and MLQA v1 (`mlqa/dev-context-XX-
    question-YY.json`, extracted from the official zip). Downloads with a known SHA-256 are
    verified. Setting `LONGFLAX_OFFLINE=1` disables downloads.

    Args:
        relative_path: Path inside the data folder, for example "squad/dev-v1.1.json".
        download_url: URL to download from instead of the official one (a mirror).

    Returns:
        Path of the local file.

    Raises:
        ValueError: If the file is not found locally and has no known download source.
        RuntimeError: If downloads are disabled, or the download or its checksum check fails.
    """
    relative_path = relative_path.strip("/")
    data_dir = os.environ.get(DATA_DIR_ENV)
    search_dirs = ([pathlib.Path(data_dir)] if data_dir else []) + [_cache_dir()]
    for folder in search_dirs:
        for candidate in _candidates(relative_path):
            if (folder / candidate).is_file():
                return folder / candidate

    key = _candidates(relative_path)[1] if relative_path.endswith(".gz") else relative_path
    sources = _official_sources()
    source = sources.get(key)
    if download_url is not None:
        source = _DownloadSource(download_url, source.zip_member if source else None)
    searched = " and ".join(str(folder) for folder in search_dirs)
    if source is None:
        raise ValueError(
            f"Data file {relative_path!r} was not found in {searched}, and it has no official "
            f"download source. Set {DATA_DIR_ENV} to a folder that contains it. Files that can "
            "be downloaded include squad/dev-v1.1.json, xquad/xquad.de.json, "
            "tydiqa-goldp/tydiqa-goldp-v1.1-dev.json and mlqa/dev-context-de-question-de.json."
        )
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise RuntimeError(
            f"Data file {relative_path!r} was not found in {searched}, and downloads are "
            f"disabled ({OFFLINE_ENV}={os.environ[OFFLINE_ENV]}). Set {DATA_DIR_ENV} to a "
            "folder that contains it, or unset the variable to download it."
        )

    target = _cache_dir() / key
    _download(source, target, relative_path=relative_path)
    # A mirror must serve the official file too, so known checksums apply to it as well.
    expected = _KNOWN_SHA256.get(key)
    if expected is not None:
        actual = hashlib.sha256(target.read_bytes()).hexdigest()
        if actual != expected:
            target.unlink()
            raise RuntimeError(
                f"Downloaded {source.url} has SHA-256 {actual}, expected {expected}. The file "
                f"was deleted. Retry, or set {DATA_DIR_ENV} to a folder with a verified copy."
            )
    return target


def _download(source: _DownloadSource, target: pathlib.Path, *, relative_path: str) -> None:
    """Download a source into `target`, extracting a zip member when the source names one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    url_name = source.url.rsplit("/", 1)[-1] or "download"
    download_path = target.parent / url_name if source.zip_member else target
    if not (source.zip_member and download_path.is_file()):
        logging.info("Downloading %s to %s", source.url, download_path)
        tmp_path = download_path.with_name(f".{download_path.name}.part")
        try:
            with (
                urllib.request.urlopen(source.url, timeout=60) as response,
                open(tmp_path, "wb") as f,
            ):
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            os.replace(tmp_path, download_path)
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"Could not download {relative_path!r} from {source.url}: {exc}. If this "
                f"machine is offline, set {DATA_DIR_ENV} to a folder that contains the file."
            ) from exc
        finally:
            tmp_path.unlink(missing_ok=True)

    if source.zip_member:
        try:
            with zipfile.ZipFile(download_path) as archive:
                data = archive.read(source.zip_member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise RuntimeError(
                f"Could not extract {source.zip_member} from {download_path}: {exc}. Delete "
                "the archive to download it again."
            ) from exc
        target.write_bytes(data)
