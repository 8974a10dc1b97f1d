"""Tests for longflax.evaluate: official SQuAD v1.1 and MLQA scoring, grouping and the CLI."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

from longflax import evaluate
from longflax.data.squad import Answer, QAExample, load_squad, save_squad

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_example(example_id, answers, metadata=None):
    """Build an example whose context contains every answer text, space-separated."""
    context = " ".join(answers)
    spans, position = [], 0
    for text in answers:
        spans.append(Answer(text=text, start=position))
        position += len(text) + 1
    return QAExample(
        id=example_id,
        title="t",
        context=context,
        question="q?",
        answers=tuple(spans),
        metadata=dict(metadata or {}),
    )


# ------------------------------------------------------------------------------------------
# SQuAD v1.1 rules


@pytest.mark.parametrize(
    ("prediction", "gold", "exact_match", "f1"),
    [
        (" Paris.", "Paris", 1.0, 1.0),
        ("the Eiffel Tower.", "Eiffel Tower", 1.0, 1.0),
        # Guillemets and the en dash are not ASCII punctuation, so they stay.
        ("«Paris»", "Paris", 0.0, 0.0),
        ("Paris–Roubaix", "Paris Roubaix", 0.0, 0.0),
        ("Denver", "Denver Broncos", 0.0, 2 / 3),
        ("An apple", "apple", 1.0, 1.0),
        # Articles are removed only as whole words.
        ("theater", "ater", 0.0, 0.0),
    ],
)
def test_squad_rules_single_answer(prediction, gold, exact_match, f1):
    assert evaluate.exact_match_score(prediction, gold) == exact_match
    assert evaluate.f1_score(prediction, gold) == pytest.approx(f1)


def test_squad_normalisation_steps():
    assert evaluate.normalize_answer("  The  QUICK, brown\tfox!  ") == "quick brown fox"
    assert evaluate.normalize_answer("a-b") == "ab"
    assert evaluate.normalize_answer("«x»") == "«x»"


def test_squad_empty_strings_follow_official_script():
    # Both sides empty after normalisation: EM 1, but F1 0 because there is no common token.
    assert evaluate.exact_match_score("the", "") == 1.0
    assert evaluate.f1_score("the", "") == 0.0


def test_squad_best_over_gold_answers():
    examples = [make_example("q", ["Denver Broncos", "Broncos"])]
    result = evaluate.score_squad(examples, {"q": "Denver"})
    assert result["exact_match"] == 0.0
    assert result["f1"] == pytest.approx(66.667, abs=1e-3)


def test_squad_three_question_dataset():
    examples = [
        make_example("exact", ["Paris"]),
        make_example("denver", ["Denver Broncos", "Broncos"]),
        make_example("missing", ["Berlin"]),
    ]
    predictions = {"exact": "Paris", "denver": "Denver", "unknown-id": "ignored"}
    result = evaluate.score_squad(examples, predictions)
    assert result["exact_match"] == pytest.approx(33.333, abs=1e-3)
    assert result["f1"] == pytest.approx(55.556, abs=1e-3)
    assert set(result) == {"exact_match", "f1"}


def test_score_empty_dataset_is_zero():
    assert evaluate.score([], {}) == {"exact_match": 0.0, "f1": 0.0}


# ------------------------------------------------------------------------------------------
# MLQA rules


@pytest.mark.parametrize(
    ("language", "prediction", "gold", "exact_match", "f1"),
    [
        # Unicode punctuation (category P*) is removed, unlike under the SQuAD rules.
        ("en", "«Paris»", "Paris", 1.0, 1.0),
        ("en", "The Eiffel Tower!", "eiffel tower", 1.0, 1.0),
        # Removing the dash joins the words: "parisroubaix" shares no token with the gold.
        ("en", "Paris–Roubaix", "Paris Roubaix", 0.0, 0.0),
        ("es", "La Casa Blanca", "casa blanca", 1.0, 1.0),
        ("es", "unos libros", "libros", 1.0, 1.0),
        ("de", "Die Deutsche Bank", "deutsche bank", 1.0, 1.0),
        ("de", "mit einer Stimme", "mit Stimme", 1.0, 1.0),
        ("de", "Denver", "ver", 0.0, 0.0),
        ("vi", "của Việt Nam", "Việt Nam", 1.0, 1.0),
        # ar: "ال" is replaced wherever it occurs, also after the prefix "ف".
        ("ar", "الكتاب", "كتاب", 1.0, 1.0),
        ("ar", "فالتاريخ", "تاريخ", 0.0, 2 / 3),
        # hi has no article rule; the danda is Unicode punctuation.
        ("hi", "the Taj", "Taj", 0.0, 2 / 3),
        ("hi", "भारत।", "भारत", 1.0, 1.0),
        # zh: every CJK character is a token; other text is split on whitespace.
        ("zh", "北京市", "北京", 0.0, 0.8),
        ("zh", "北京 市", "北京市", 1.0, 1.0),
        ("zh", "iPhone手机", "iPhone", 0.0, 0.5),
        ("zh", "北京，上海", "北京上海", 1.0, 1.0),
        ("zh", "the 北京", "北京", 0.0, 0.8),
    ],
)
def test_mlqa_rules_per_language(language, prediction, gold, exact_match, f1):
    em = evaluate.exact_match_score(prediction, gold, rules="mlqa", language=language)
    f1_value = evaluate.f1_score(prediction, gold, rules="mlqa", language=language)
    assert em == exact_match
    assert f1_value == pytest.approx(f1)


def test_mlqa_zh_normalised_tokens():
    normalized = evaluate.normalize_answer("iPhone 手机，很好", rules="mlqa", language="zh")
    assert normalized == "iphone 手 机 很 好"


def test_mlqa_ar_replaces_substring_with_space():
    normalized = evaluate.normalize_answer("فالتاريخ", rules="mlqa", language="ar")
    assert normalized == "ف تاريخ"


def test_mlqa_language_from_metadata():
    examples = [
        make_example("de1", ["Bank"], {"language": "de"}),
        make_example("es1", ["casa"], {"language": "es"}),
    ]
    result = evaluate.score(examples, {"de1": "die Bank", "es1": "la casa"}, rules="mlqa")
    assert result == {"exact_match": 100.0, "f1": 100.0}


def test_mlqa_unknown_language_raises():
    with pytest.raises(ValueError, match=r"got 'fr'\. Supported languages: ar, de, en, es, hi"):
        evaluate.normalize_answer("x", rules="mlqa", language="fr")


def test_mlqa_without_language_raises():
    examples = [make_example("q1", ["x"])]
    with pytest.raises(ValueError, match=r"example 'q1' has no 'language' metadata"):
        evaluate.score(examples, {"q1": "x"}, rules="mlqa")


def test_unknown_rules_raise():
    with pytest.raises(ValueError, match=r"rules must be 'squad' or 'mlqa', got 'bleu'"):
        evaluate.normalize_answer("x", rules="bleu")
    with pytest.raises(ValueError, match=r"rules must be 'squad' or 'mlqa', got 'bleu'"):
        evaluate.score([make_example("q", ["x"])], {"q": "x"}, rules="bleu")


def test_predictions_must_be_strings():
    examples = [make_example("q1", ["x"])]
    with pytest.raises(ValueError, match=r"prediction for question 'q1' is int 3"):
        evaluate.score(examples, {"q1": 3})
    with pytest.raises(ValueError, match=r"predictions must map question id .* got list"):
        evaluate.score(examples, ["x"])


# ------------------------------------------------------------------------------------------
# Groups, aggregation and tables


def test_score_by_gold_position():
    examples = [
        make_example("a", ["one"], {"gold_position": 0}),
        make_example("b", ["two"], {"gold_position": 2}),
        make_example("c", ["three"], {"gold_position": 0}),
        make_example("d", ["four"], {"gold_position": 1}),
    ]
    result = evaluate.score_by(examples, {"a": "one", "b": "two", "c": "wrong"})
    assert list(result) == [0, 1, 2]
    assert result[0] == {"exact_match": 50.0, "f1": 50.0, "count": 2}
    assert result[1] == {"exact_match": 0.0, "f1": 0.0, "count": 1}
    assert result[2] == {"exact_match": 100.0, "f1": 100.0, "count": 1}


def test_score_by_custom_key_keeps_unsortable_groups():
    examples = [make_example("a", ["x"]), make_example("b", ["y"], {"gold_position": 1})]
    result = evaluate.score_by(
        examples, {"a": "x"}, key=lambda ex: ex.metadata.get("gold_position")
    )
    assert list(result) == [None, 1]
    by_title = evaluate.score_by(examples, {"a": "x"}, key=lambda ex: ex.title)
    assert by_title == {"t": {"exact_match": 50.0, "f1": 50.0, "count": 2}}


def test_aggregate_runs_uses_sample_std():
    runs = [
        {"exact_match": 80.0, "f1": 90.0},
        {"exact_match": 82.0, "f1": 91.0},
        {"exact_match": 84.0, "f1": 92.0},
    ]
    summary = evaluate.aggregate_runs(runs)
    assert summary["exact_match"]["mean"] == pytest.approx(82.0)
    # The population std would be 1.633; the sample std (n - 1) is 2.
    assert summary["exact_match"]["std"] == pytest.approx(2.0)
    assert summary["f1"]["std"] == pytest.approx(1.0)
    assert summary["f1"]["n"] == 3


def test_aggregate_single_run_std_is_nan():
    summary = evaluate.aggregate_runs([{"exact_match": 80.0, "f1": 90.0}])
    assert summary["f1"]["mean"] == 90.0
    assert math.isnan(summary["f1"]["std"])


def test_aggregate_runs_errors():
    with pytest.raises(ValueError, match=r"at least one run; got an empty list"):
        evaluate.aggregate_runs([])
    with pytest.raises(ValueError, match=r"Run 1 has metrics \['f1'\], but run 0 has"):
        evaluate.aggregate_runs([{"exact_match": 1.0, "f1": 2.0}, {"f1": 2.0}])


def test_markdown_table():
    results = {
        "de": {"exact_match": 45.25, "f1": 60.0},
        "en": evaluate.aggregate_runs(
            [{"exact_match": 64.0, "f1": 77.0}, {"exact_match": 66.0, "f1": 79.0}]
        ),
    }
    table = evaluate.format_markdown_table(results)
    assert table == (
        "| language | EM | F1 |\n"
        "|---|---:|---:|\n"
        "| de | 45.2 | 60.0 |\n"
        "| en | 65.0 ± 1.4 | 78.0 ± 1.4 |\n"
        "| average | 55.1 | 69.0 |\n"
    )


def test_markdown_table_errors():
    with pytest.raises(ValueError, match=r"needs results for at least one language"):
        evaluate.format_markdown_table({})
    with pytest.raises(ValueError, match=r"language 'de' lack metrics \['f1'\]"):
        evaluate.format_markdown_table({"de": {"exact_match": 1.0}})


# ------------------------------------------------------------------------------------------
# Command line


@pytest.fixture
def cli_files(tmp_path):
    examples = [
        make_example("exact", ["Paris"], {"gold_position": 0}),
        make_example("denver", ["Denver Broncos", "Broncos"], {"gold_position": 1}),
        make_example("missing", ["Berlin"], {"gold_position": 1}),
    ]
    data = tmp_path / "gold.json"
    save_squad(examples, data)
    run1 = tmp_path / "run1.json"
    run1.write_text(json.dumps({"exact": "Paris", "denver": "Denver"}))
    run2 = tmp_path / "run2.json"
    run2.write_text(json.dumps({"exact": "Paris", "denver": "Broncos", "missing": "Berlin"}))
    return data, run1, run2


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "longflax.evaluate", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=120,
    )


def test_cli_prints_json(cli_files):
    data, run1, _ = cli_files
    completed = run_cli("--data", data, "--predictions", run1, "--by-gold-position")
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    assert result["exact_match"] == pytest.approx(33.333, abs=1e-3)
    assert result["f1"] == pytest.approx(55.556, abs=1e-3)
    assert result["num_questions"] == 3
    assert result["by_gold_position"]["0"]["exact_match"] == 100.0
    assert result["by_gold_position"]["1"]["count"] == 2


def test_cli_several_runs_gives_mean_and_std(cli_files, capsys):
    data, run1, run2 = cli_files
    assert (
        evaluate.main(["--data", str(data), "--predictions", str(run1), "--predictions", str(run2)])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["exact_match"] == pytest.approx((100 / 3 + 100) / 2)
    assert result["aggregate"]["exact_match"]["n"] == 2
    assert result["aggregate"]["exact_match"]["std"] == pytest.approx(47.140, abs=1e-3)
    assert [run["predictions"] for run in result["runs"]] == [str(run1), str(run2)]


def test_cli_mlqa_rules(tmp_path, capsys):
    data = tmp_path / "de.json"
    save_squad([make_example("q", ["Deutsche Bank"])], data)
    predictions = tmp_path / "p.json"
    predictions.write_text(json.dumps({"q": "die „Deutsche Bank“"}))
    args = ["--data", str(data), "--predictions", str(predictions), "--rules", "mlqa"]
    assert evaluate.main([*args, "--language", "de"]) == 0
    assert json.loads(capsys.readouterr().out)["exact_match"] == 100.0


def test_cli_missing_predictions_file(cli_files, tmp_path, capsys):
    data, _, _ = cli_files
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--data", str(data), "--predictions", str(tmp_path / "absent.json")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "Predictions file not found" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"is not valid UTF-8 JSON"),
        ('["a", "b"]', r"contains a JSON list; expected a JSON object mapping question id"),
        ('{"q": 1}', r"prediction for question 'q' is int 1"),
    ],
)
def test_cli_invalid_predictions(cli_files, tmp_path, capsys, content, message):
    data, _, _ = cli_files
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--data", str(data), "--predictions", str(bad)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_missing_data_file(tmp_path, cli_files, capsys):
    _, run1, _ = cli_files
    with pytest.raises(SystemExit):
        evaluate.main(["--data", str(tmp_path / "none.json"), "--predictions", str(run1)])
    assert "Data file not found" in capsys.readouterr().err


def test_cli_mlqa_needs_language(cli_files, capsys):
    data, run1, _ = cli_files
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--data", str(data), "--predictions", str(run1), "--rules", "mlqa"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--rules mlqa needs --language set to one of" in message
    assert "(got None); for other languages use --rules squad" in message


# ------------------------------------------------------------------------------------------
# Real data


@pytest.mark.data
def test_gold_answers_score_100_on_squad_dev(data_dir):
    examples = load_squad(data_dir / "squad" / "dev-v1.1.json.gz")
    predictions = {example.id: example.answers[0].text for example in examples}
    assert evaluate.score_squad(examples, predictions) == {"exact_match": 100.0, "f1": 100.0}


@pytest.mark.data
def test_gold_answers_score_100_on_mlqa_de(data_dir):
    examples = load_squad(data_dir / "mlqa" / "dev-context-de-question-de.from-hf-arrow.json")
    predictions = {example.id: example.answers[0].text for example in examples}
    result = evaluate.score(examples, predictions, rules="mlqa", language="de")
    assert result == {"exact_match": 100.0, "f1": 100.0}



@pytest.mark.data
def test_cli_reads_data_path(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LONGFLAX_DATA_DIR", str(data_dir))
    examples = load_squad(data_dir / "xquad" / "xquad.de.json")
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps({example.id: example.answers[0].text for example in examples}))
    assert evaluate.main(["--data", "data:xquad/xquad.de.json", "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exact_match"] == 100.0
    assert result["num_questions"] == len(examples)
