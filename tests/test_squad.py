"""Tests for longflax.data.squad: loading, validation, saving and finding data files."""

import functools
import gzip
import hashlib
import http.server
import io
import json
import socket
import sys
import threading
import zipfile

import pytest

from longflax.data import squad
from longflax.data.squad import Answer, QAExample

PURE_LAND = " The Pure Land sect was founded in Japan."


def squad_document(paragraphs, *, version="1.1", title="Article"):
    """Build a SQuAD JSON document from (context, qas) pairs."""
    document = {
        "data": [
            {
                "title": title,
                "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs],
            }
        ]
    }
    if version is not None:
        document["version"] = version
    return document


def qa(qid, answers, **extra):
    return {
        "id": qid,
        "question": f"Question {qid}?",
        "answers": [{"text": t, "answer_start": s} for t, s in answers],
        **extra,
    }


def write_json(path, document):
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(document, f)
    else:
        path.write_text(json.dumps(document), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Loading


def test_leading_space_context_keeps_offsets(tmp_path):
    path = write_json(
        tmp_path / "d.json", squad_document([(PURE_LAND, [qa("q1", [("Pure Land", 5)])])])
    )
    (example,) = squad.load_squad(path)
    assert example.context == PURE_LAND
    assert example.context[5:14] == "Pure Land"
    assert example.answers == (Answer("Pure Land", 5),)


@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_load_without_version_key(tmp_path, name):
    document = squad_document([("Paris is big.", [qa("q1", [("Paris", 0)])])], version=None)
    (example,) = squad.load_squad(write_json(tmp_path / name, document))
    assert example.id == "q1"
    assert example.title == "Article"
    assert example.question == "Question q1?"


def test_extra_qa_fields_become_metadata(tmp_path):
    entry = qa("q1", [("Paris", 0)], gold_position=2, num_contexts=3, language="en")
    path = write_json(tmp_path / "d.json", squad_document([("Paris is big.", [entry])]))
    (example,) = squad.load_squad(path)
    assert example.metadata == {"gold_position": 2, "num_contexts": 3, "language": "en"}


def test_squad_v2_unanswerable_are_counted(tmp_path):
    context = "Paris is big."
    qas = [
        qa("answerable", [("Paris", 0)], is_impossible=False),
        {"id": "impossible", "question": "?", "answers": [], "is_impossible": True},
        {
            "id": "impossible2",
            "question": "?",
            "answers": [],
            "plausible_answers": [{"text": "big", "answer_start": 9}],
            "is_impossible": True,
        },
    ]
    path = write_json(tmp_path / "v2.json", squad_document([(context, qas)], version="v2.0"))
    examples, report = squad.load_squad_with_report(path)
    assert [e.id for e in examples] == ["answerable"]
    assert report.num_unanswerable == 2
    assert report.num_questions == 3
    assert report.problems == {}


@pytest.fixture
def invalid_file(tmp_path):
    context = "Paris is the capital of France."
    qas = [
        qa("good", [("Paris", 0)]),
        qa("off-by-one", [("Paris", 1)]),
        qa("negative", [("Paris", 0), ("France", -1)]),
        {"id": "no-answers", "question": "?", "answers": []},
        {"id": "no-question", "answers": [{"text": "Paris", "answer_start": 0}]},
        qa("good", [("France", 24)]),
    ]
    return write_json(tmp_path / "bad.json", squad_document([(context, qas)]))


def test_invalid_questions_raise_with_counts(invalid_file):
    with pytest.raises(ValueError) as error:
        squad.load_squad(invalid_file)
    message = str(error.value)
    assert "5 of 6 questions are invalid" in message
    assert "missing or invalid field: 2 (first ids: 'no-answers', 'no-question')" in message
    assert (
        "answer_start does not point at the answer text: 2 (first ids: 'off-by-one', 'negative')"
        in message
    )
    assert "duplicate question id: 1 (first ids: 'good')" in message
    assert "pass on_invalid='skip'" in message


def test_invalid_questions_skipped_and_counted(invalid_file):
    examples, report = squad.load_squad_with_report(invalid_file, on_invalid="skip")
    assert [e.id for e in examples] == ["good"]
    assert report.num_invalid == 5
    assert report.problems[squad.MISALIGNED_ANSWER] == 2
    assert report.problems[squad.MISSING_FIELD] == 2
    assert report.problems[squad.DUPLICATE_ID] == 1
    assert report.problem_ids[squad.MISALIGNED_ANSWER] == ["off-by-one", "negative"]


def test_unchecked_offsets_keep_misaligned_answers(invalid_file):
    examples, report = squad.load_squad_with_report(
        invalid_file, on_invalid="skip", check_offsets=False
    )
    assert [e.id for e in examples] == ["good", "off-by-one", "negative"]
    assert squad.find_misaligned_answers(examples) == [
        ("off-by-one", Answer("Paris", 1)),
        ("negative", Answer("France", -1)),
    ]
    assert report.problems == {squad.MISSING_FIELD: 2, squad.DUPLICATE_ID: 1}


def test_untitled_article_and_non_object_entry(tmp_path):
    document = {
        "data": [{"paragraphs": [{"context": "Paris.", "qas": ["q", qa("ok", [("Paris", 0)])]}]}]
    }
    examples, report = squad.load_squad_with_report(
        write_json(tmp_path / "d.json", document), on_invalid="skip"
    )
    assert [(e.id, e.title) for e in examples] == [("ok", "")]
    assert report.problems == {squad.MISSING_FIELD: 1}
    assert report.problem_ids[squad.MISSING_FIELD] == ["<question 1>"]


def test_limit_stops_after_valid_examples(invalid_file):
    examples = squad.load_squad(invalid_file, on_invalid="skip", limit=1)
    assert [e.id for e in examples] == ["good"]


def test_argument_errors(invalid_file):
    with pytest.raises(ValueError, match=r"on_invalid must be 'error' or 'skip', got 'keep'"):
        squad.load_squad(invalid_file, on_invalid="keep")
    with pytest.raises(
        ValueError, match=r"limit must be a positive number of examples or None, got 0"
    ):
        squad.load_squad(invalid_file, limit=0)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Data file not found: .*absent\.json"):
        squad.load_squad(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(ValueError, match=r"broken\.json is not valid UTF-8 JSON"):
        squad.load_squad(broken)
    not_gzip = tmp_path / "plain.json.gz"
    not_gzip.write_text("{}")
    with pytest.raises(ValueError, match=r"plain\.json\.gz is not valid UTF-8 JSON"):
        squad.load_squad(not_gzip)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([1, 2], r"expected a JSON object with a 'data' list of articles"),
        ({"version": "1.1"}, r"expected a JSON object with a 'data' list of articles"),
        ({"data": [{"title": "x"}]}, r"an article has no 'paragraphs' list"),
        (
            {"data": [{"title": "x", "paragraphs": [{"context": "c"}]}]},
            r"a paragraph has no 'qas' list",
        ),
    ],
)
def test_not_squad_format(tmp_path, document, message):
    path = write_json(tmp_path / "other.json", document)
    with pytest.raises(ValueError, match=message):
        squad.load_squad(path)


# ------------------------------------------------------------------------------------------
# Hub sources


def test_hub_source_form_errors():
    with pytest.raises(
        ValueError,
        match=r"Invalid data source 'hf:squad': expected the form hf:NAME\[:CONFIG\]:SPLIT",
    ):
        squad.load_squad("hf:squad")
    with pytest.raises(
        ValueError, match=r"Invalid data source 'tfds:a:b:c': expected the form tfds:NAME:SPLIT"
    ):
        squad.load_squad("tfds:a:b:c")


def test_hf_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(
        RuntimeError, match=r"needs the Hugging Face 'datasets' package.*pip install"
    ):
        squad.load_squad("hf:squad:validation")


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(RuntimeError, match=r"needs the 'tensorflow-datasets' package.*pip install"):
        squad.load_squad("tfds:squad:validation")


def test_hf_offline_error():
    pytest.importorskip("datasets")
    with pytest.raises(
        RuntimeError, match=r"Could not load 'hf:longflax-test/no-such-dataset:validation'"
    ):
        squad.load_squad("hf:longflax-test/no-such-dataset:validation")


def test_tfds_missing_dataset_error():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        RuntimeError, match=r"Could not load 'tfds:longflax_no_such_dataset:validation'"
    ):
        squad.load_squad("tfds:longflax_no_such_dataset:validation")


def test_hf_local_dataset_rows(tmp_path):
    pytest.importorskip("datasets")
    rows = [
        {
            "id": "q1",
            "title": "T",
            "context": PURE_LAND,
            "question": "Which sect?",
            "answers": {"text": ["Pure Land", "Pure Land sect"], "answer_start": [5, 5]},
        },
        {
            "id": "q2",
            "title": "T",
            "context": PURE_LAND,
            "question": "Unanswerable?",
            "answers": {"text": [], "answer_start": []},
        },
    ]
    folder = tmp_path / "local_squad"
    folder.mkdir()
    (folder / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    examples, report = squad.load_squad_with_report(f"hf:{folder}:validation")
    assert report.num_unanswerable == 1
    (example,) = examples
    assert example.context[5:14] == "Pure Land"
    assert example.answers == (Answer("Pure Land", 5), Answer("Pure Land sect", 5))
    assert example.title == "T"


# ------------------------------------------------------------------------------------------
# Saving


def test_save_and_load_round_trip(tmp_path):
    examples = [
        QAExample("a", "T1", PURE_LAND, "Which?", (Answer("Pure Land", 5),), {"gold_position": 1}),
        QAExample(
            "b", "T1", PURE_LAND, "Where?", (Answer("Japan", 35), Answer("in Japan", 32)), {}
        ),
        QAExample("c", "T2", "Zürich «x» – y", "Q?", (Answer("«x»", 7),), {"lang": "de"}),
        QAExample("d", "T1", PURE_LAND, "Again?", (Answer("sect", 15),), {}),
    ]
    for name in ("out.json", "sub/out.json.gz"):
        squad.save_squad(examples, tmp_path / name)
        assert squad.load_squad(tmp_path / name) == examples
    document = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert document["version"] == "1.1"
    assert [article["title"] for article in document["data"]] == ["T1", "T2", "T1"]
    assert len(document["data"][0]["paragraphs"]) == 1
    assert document["data"][0]["paragraphs"][0]["qas"][0]["gold_position"] == 1


def test_save_errors(tmp_path):
    clash = QAExample("a", "", "ctx", "q", (Answer("ctx", 0),), {"answers": []})
    with pytest.raises(
        ValueError, match=r"metadata keys \['answers'\] that are standard SQuAD qa keys"
    ):
        squad.save_squad([clash], tmp_path / "x.json")
    unserialisable = QAExample("a", "", "ctx", "q", (Answer("ctx", 0),), {"when": object()})
    with pytest.raises(ValueError, match=r"a metadata value is not JSON serialisable"):
        squad.save_squad([unserialisable], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------------------
# Finding and downloading data files


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """Point the data and cache folders at empty temporary folders and allow downloads."""
    data = tmp_path / "data"
    cache = tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv(squad.DATA_DIR_ENV, str(data))
    monkeypatch.setenv(squad.CACHE_DIR_ENV, str(cache))
    monkeypatch.delenv(squad.OFFLINE_ENV, raising=False)
    for variable in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(variable, raising=False)
    return data, cache


@pytest.fixture
def loopback_server(tmp_path):
    """Serve the files of a temporary folder over HTTP on 127.0.0.1."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
        pass


def closed_loopback_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/dev-v1.1.json"


def test_resolve_prefers_data_dir_with_or_without_gz(data_env):
    data, _ = data_env
    (data / "squad").mkdir()
    (data / "squad" / "dev-v1.1.json.gz").write_bytes(b"x")
    (data / "xquad").mkdir()
    (data / "xquad" / "xquad.de.json").write_bytes(b"x")
    assert squad.resolve_data_file("squad/dev-v1.1.json") == data / "squad" / "dev-v1.1.json.gz"
    assert squad.resolve_data_file("squad/dev-v1.1.json.gz") == data / "squad" / "dev-v1.1.json.gz"
    assert squad.resolve_data_file("xquad/xquad.de.json.gz") == data / "xquad" / "xquad.de.json"


def test_resolve_finds_cached_file(data_env):
    _, cache = data_env
    (cache / "squad").mkdir(parents=True)
    (cache / "squad" / "dev-v1.1.json").write_bytes(b"x")
    assert squad.resolve_data_file("squad/dev-v1.1.json") == cache / "squad" / "dev-v1.1.json"


def test_resolve_unknown_file_raises(data_env):
    with pytest.raises(
        ValueError,
        match=r"'squad/other\.json' was not found in .* no official download source\. Set LONGFLAX",
    ):
        squad.resolve_data_file("squad/other.json")


def test_resolve_offline_raises(data_env, monkeypatch):
    monkeypatch.setenv(squad.OFFLINE_ENV, "1")
    with pytest.raises(
        RuntimeError, match=r"downloads are disabled \(LONGFLAX_OFFLINE=1\)\. Set LONGFLAX_DATA_DIR"
    ):
        squad.resolve_data_file("squad/dev-v1.1.json")


def test_resolve_unreachable_url_raises(data_env):
    url = closed_loopback_url()
    with pytest.raises(
        RuntimeError,
        match=r"Could not download 'squad/dev-v1\.1\.json' from .* set LONGFLAX_DATA_DIR",
    ):
        squad.resolve_data_file("squad/dev-v1.1.json", download_url=url)
    _, cache = data_env
    assert not any(cache.rglob("*.part"))


def test_resolve_downloads_into_cache(data_env, loopback_server):
    _, cache = data_env
    root, base_url = loopback_server
    (root / "goldp.json").write_text('{"data": []}')
    path = squad.resolve_data_file(
        "tydiqa-goldp/tydiqa-goldp-v1.1-dev.json", download_url=f"{base_url}/goldp.json"
    )
    assert path == cache / "tydiqa-goldp" / "tydiqa-goldp-v1.1-dev.json"
    assert path.read_text() == '{"data": []}'
    # The second call finds the cached copy without downloading.
    (root / "goldp.json").unlink()
    assert squad.resolve_data_file("tydiqa-goldp/tydiqa-goldp-v1.1-dev.json") == path


def test_resolve_extracts_mlqa_zip_member(data_env, loopback_server):
    _, cache = data_env
    root, base_url = loopback_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("MLQA_V1/dev/dev-context-en-question-en.json", '{"data": ["en"]}')
        archive.writestr("MLQA_V1/test/test-context-en-question-en.json", '{"data": ["test"]}')
    (root / "MLQA_V1.zip").write_bytes(buffer.getvalue())
    path = squad.resolve_data_file(
        "mlqa/dev-context-en-question-en.json", download_url=f"{base_url}/MLQA_V1.zip"
    )
    assert path == cache / "mlqa" / "dev-context-en-question-en.json"
    assert path.read_text() == '{"data": ["en"]}'


def test_resolve_bad_zip_raises(data_env, loopback_server):
    root, base_url = loopback_server
    (root / "MLQA_V1.zip").write_bytes(b"not a zip")
    with pytest.raises(
        RuntimeError, match=r"Could not extract MLQA_V1/dev/dev-context-en-question-en\.json"
    ):
        squad.resolve_data_file(
            "mlqa/dev-context-en-question-en.json", download_url=f"{base_url}/MLQA_V1.zip"
        )


def test_resolve_checksum_mismatch_raises(data_env, loopback_server):
    _, cache = data_env
    root, base_url = loopback_server
    (root / "dev-v1.1.json").write_text('{"data": []}')
    actual = hashlib.sha256(b'{"data": []}').hexdigest()
    with pytest.raises(
        RuntimeError, match=rf"has SHA-256 {actual}, expected 95aa6a52.*was deleted"
    ):
        squad.resolve_data_file("squad/dev-v1.1.json", download_url=f"{base_url}/dev-v1.1.json")
    assert not (cache / "squad" / "dev-v1.1.json").exists()


# ------------------------------------------------------------------------------------------
# Real data


@pytest.mark.data
@pytest.mark.parametrize(
    ("relative_path", "num_questions"),
    [
        ("squad/dev-v1.1.json.gz", 10570),
        ("xquad/xquad.de.json", 1190),
        ("xquad/xquad.zh.json", 1190),
        ("mlqa/dev-context-de-question-de.from-hf-arrow.json", 512),
        ("tydiqa-goldp/arabic_tydiqa_dev.json.gz", 921),
    ],
)
def test_real_files_load_aligned(data_dir, relative_path, num_questions):
    examples, report = squad.load_squad_with_report(data_dir / relative_path)
    assert report.problems == {}
    assert report.num_loaded == num_questions
    assert squad.find_misaligned_answers(examples) == []


@pytest.mark.data
def test_resolve_finds_real_squad_dev(data_dir, monkeypatch):
    monkeypatch.setenv(squad.DATA_DIR_ENV, str(data_dir))
    monkeypatch.setenv(squad.OFFLINE_ENV, "1")
    assert squad.resolve_data_file("squad/dev-v1.1.json") == data_dir / "squad" / "dev-v1.1.json.gz"


@pytest.mark.data
def test_real_misaligned_file_counts(data_dir):
    # The published SQuAD-it test file has answers whose offsets do not match their text.
    path = data_dir / "other-qa" / "SQuAD_it-test.json.gz"
    with pytest.raises(ValueError, match=r"answer_start does not point at the answer text: 49"):
        squad.load_squad(path)
    examples, report = squad.load_squad_with_report(path, on_invalid="skip")
    assert report.problems == {squad.MISALIGNED_ANSWER: 49}
    assert len(examples) == 7609 - 49
