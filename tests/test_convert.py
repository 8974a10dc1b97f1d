"""Tests for longflax.convert: position table, global projections, config carry-over and the CLI."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_hf_model, random_ids

import longflax
from longflax import convert
from longflax.hf_weights import flat_params

pytestmark = pytest.mark.torch
pytest.importorskip("torch")

MAX_LENGTH = 256
WINDOW = 32


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


def forward(model, **inputs):
    return _forward(
        model, {name: jnp.asarray(value) for name, value in inputs.items() if value is not None}
    )


def params_of(model):
    return {path: np.asarray(var[...]) for path, var in flat_params(model).items()}


@pytest.fixture(scope="module")
def xlmr_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("xlmr")
    make_hf_model("XLMRobertaForMaskedLM", directory, seed=20)
    return directory


@pytest.fixture(scope="module")
def xlmr_pair(xlmr_directory):
    source, _ = longflax.load(xlmr_directory)
    long_model, config = convert.convert_to_long(
        source, max_length=MAX_LENGTH, attention_window=WINDOW
    )
    return source, long_model, config


# ----------------------------------------------------------------------------------------------
# Position table


def test_position_table_extension_by_tiling():
    table = np.arange(20, dtype=np.float32).reshape(10, 2)

    extended = convert.extend_position_table(table, offset=2, new_rows=20)

    assert extended.shape == (20, 2)
    np.testing.assert_array_equal(extended[:2], table[:2])
    np.testing.assert_array_equal(extended[2:10], table[2:])
    np.testing.assert_array_equal(extended[10:18], table[2:])
    # The target is not a whole number of copies: the last copy is cut short.
    np.testing.assert_array_equal(extended[18:], table[2:4])


def test_position_table_extension_without_offset():
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    extended = convert.extend_position_table(table, offset=0, new_rows=10)
    np.testing.assert_array_equal(extended, np.concatenate([table, table, table[:2]]))


def test_converted_position_table(xlmr_pair):
    source, long_model, config = xlmr_pair
    path = "encoder/embeddings/position_embeddings/embedding"
    old = params_of(source)[path]
    new = params_of(long_model)[path]

    assert config.max_position_embeddings == MAX_LENGTH + 2
    assert new.shape == (MAX_LENGTH + 2, 32)
    np.testing.assert_array_equal(new[:130], old)
    np.testing.assert_array_equal(new[130:258], old[2:130])


# ----------------------------------------------------------------------------------------------
# Global projections


def test_global_projections_are_separate_copies(xlmr_pair):
    _, long_model, _ = xlmr_pair
    params = params_of(long_model)
    for layer in range(2):
        for name in ("query", "key", "value"):
            for leaf in ("kernel", "bias"):
                local = params[f"encoder/layers/{layer}/attention/{name}/{leaf}"]
                copy = params[f"encoder/layers/{layer}/attention/{name}_global/{leaf}"]
                np.testing.assert_array_equal(copy, local)

    attention = long_model.encoder.layers[0].attention
    before = np.asarray(attention.query_global.kernel[...])
    original = attention.query.kernel[...]
    attention.query.kernel[...] = original + 1.0
    try:
        np.testing.assert_array_equal(np.asarray(attention.query_global.kernel[...]), before)
    finally:
        attention.query.kernel[...] = original


# ----------------------------------------------------------------------------------------------
# Config carry-over and outputs


def test_config_fields_carried_over(xlmr_pair):
    source, long_model, config = xlmr_pair
    assert config.family == "xlm-roberta"
    assert config.type_vocab_size == 1
    assert config.layer_norm_eps == 1e-5
    assert config.vocab_size == 1000
    assert config.pad_token_id == 1
    assert config.bos_token_id == 0
    assert config.eos_token_id == 2
    assert config.hidden_act == source.config.hidden_act
    assert config.attention == "longformer"
    assert config.attention_window == (WINDOW, WINDOW)
    assert config.max_sequence_length == MAX_LENGTH
    path = "encoder/embeddings/token_type_embeddings/embedding"
    new_types = params_of(long_model)[path]
    assert new_types.shape == (1, 32)
    np.testing.assert_array_equal(new_types, params_of(source)[path])


@pytest.mark.parametrize("with_globals", [False, True])
def test_short_inputs_reproduce_source(xlmr_pair, with_globals):
    # Within window // 2 + 1 tokens every token sees every other one, so the long model must
    # compute exactly what the source computes.
    source, long_model, _ = xlmr_pair
    length = WINDOW // 2 + 1
    ids, mask = random_ids(2, length, seed=21, pad_tail=(0, 4))
    flags = None
    if with_globals:
        flags = np.zeros_like(ids)
        flags[:, 0] = 1
        flags[1, 3] = 1

    expected = forward(source, input_ids=ids, attention_mask=mask).logits
    converted = forward(
        long_model, input_ids=ids, attention_mask=mask, global_attention_mask=flags
    ).logits

    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(converted)[real], np.asarray(expected)[real], atol=1e-5)


def test_bert_family_conversion(tmp_path):
    make_hf_model("BertModel", tmp_path, seed=22)
    source, _ = longflax.load(tmp_path)
    long_model, config = convert.convert_to_long(
        source, max_length=MAX_LENGTH, attention_window=WINDOW
    )

    assert config.family == "bert"
    assert config.pad_token_id == 0
    assert config.type_vocab_size == 2
    assert config.max_position_embeddings == MAX_LENGTH
    table = params_of(long_model)["embeddings/position_embeddings/embedding"]
    old_table = params_of(source)["embeddings/position_embeddings/embedding"]
    np.testing.assert_array_equal(table[:128], old_table)
    np.testing.assert_array_equal(table[128:], old_table)

    ids, mask = random_ids(2, WINDOW // 2 + 1, seed=22, pad_tail=(0, 3), pad_id=0)
    ids[:, 0] = 101
    types = np.zeros_like(ids)
    types[:, 8:] = 1
    flags = np.zeros_like(ids)
    flags[:, 0] = 1
    expected = forward(source, input_ids=ids, attention_mask=mask, token_type_ids=types)
    converted = forward(
        long_model,
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=types,
        global_attention_mask=flags,
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(converted.last_hidden_state)[real],
        np.asarray(expected.last_hidden_state)[real],
        atol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(converted.pooler_output), np.asarray(expected.pooler_output), atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Validation and the command line


@pytest.mark.parametrize(
    ("max_length", "window", "message"),
    [
        (256, 33, r"--attention-window=33 must be even and positive"),
        (256, 0, r"--attention-window=0 must be even and positive"),
        (200, 256, r"--attention-window=256 is larger than --max-length=200"),
        (128, 32, r"--max-length=128 must be larger than the source model's maximum of 128 tokens"),
    ],
)
def test_invalid_conversion_rejected(xlmr_pair, max_length, window, message):
    source, _, _ = xlmr_pair
    with pytest.raises(ValueError, match=message):
        convert.convert_to_long(source, max_length=max_length, attention_window=window)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--attention-window", "33"], "error: --attention-window=33 must be even and positive"),
        (
            ["--max-length", "200", "--attention-window", "256"],
            "error: --attention-window=256 is larger than",
        ),
        (
            ["--max-length", "128"],
            "error: --max-length=128 must be larger than the source model's maximum",
        ),
    ],
)
def test_cli_errors(xlmr_directory, tmp_path, capsys, options, message):
    status = convert.main(
        ["--source", str(xlmr_directory), "--output", str(tmp_path / "out"), *options]
    )
    assert status == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_missing_source(tmp_path, capsys):
    status = convert.main(["--source", str(tmp_path / "absent"), "--output", str(tmp_path / "out")])
    assert status == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_cli_converts_and_prints_summary(xlmr_directory, xlmr_pair, tmp_path, capsys):
    output = tmp_path / "long"
    status = convert.main(
        [
            "--source",
            str(xlmr_directory),
            "--output",
            str(output),
            "--max-length",
            str(MAX_LENGTH),
            "--attention-window",
            str(WINDOW),
        ]
    )

    printed = capsys.readouterr().out
    assert status == 0
    assert f"source:            {xlmr_directory}" in printed
    assert "head:              mlm" in printed
    assert f"maximum length:    128 -> {MAX_LENGTH} tokens" in printed
    assert f"attention window:  {WINDOW} ({WINDOW // 2} per side), global slots 64" in printed
    assert "tokenizer:         none found in the source" in printed

    loaded, _ = longflax.load(output)
    assert loaded.config == xlmr_pair[2]
    expected = params_of(xlmr_pair[1])
    for path, value in params_of(loaded).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=path)
