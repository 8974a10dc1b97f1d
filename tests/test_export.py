"""Tests for longflax.export: Hugging Face directories that load cleanly and compute the same outputs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_hf_model, random_ids, torch_outputs

import longflax
from longflax import convert, export, model_io

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_LENGTH = 256
WINDOW = 16
ATOL = 1e-4


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


def forward(model, **inputs):
    return _forward(
        model, {name: jnp.asarray(value) for name, value in inputs.items() if value is not None}
    )


def load_with_info(auto_class, directory, **kwargs):
    """Load an exported directory and check that every tensor matched a parameter."""
    model, info = auto_class.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    model.eval()
    return model


def global_input(length=37, *, seed=30):
    ids, mask = random_ids(1, length, seed=seed)
    flags = np.zeros_like(ids)
    flags[0, 0] = 1
    return ids, mask, flags


@pytest.fixture(scope="module")
def xlmr_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("xlmr")
    make_hf_model("XLMRobertaForMaskedLM", directory, seed=30)
    return directory


@pytest.fixture(scope="module")
def long_models(xlmr_directory):
    """Converted long models of one source: with the masked-LM head and with a new QA head."""
    models = {}
    for head in ("mlm", "qa"):
        source, _ = longflax.load(xlmr_directory, head=head)
        models[head], _ = convert.convert_to_long(
            source, max_length=MAX_LENGTH, attention_window=WINDOW
        )
    return models


# ----------------------------------------------------------------------------------------------
# Long models exported as Longformer


def test_masked_lm_export_matches(long_models, tmp_path):
    model = long_models["mlm"]
    export.export_model(model, tmp_path, head="mlm")
    reference = load_with_info(transformers.AutoModelForMaskedLM, tmp_path)
    ids, mask, flags = global_input()

    ours = forward(model, input_ids=ids, attention_mask=mask, global_attention_mask=flags)
    theirs = torch_outputs(
        reference, input_ids=ids, attention_mask=mask, global_attention_mask=flags
    )

    assert type(reference).__name__ == "LongformerForMaskedLM"
    np.testing.assert_allclose(np.asarray(ours.logits), theirs.logits.numpy(), atol=ATOL)
    # The decoder is tied to the word embeddings and the head bias is loaded, not re-initialised.
    assert reference.lm_head.decoder.weight.data_ptr() == (
        reference.longformer.embeddings.word_embeddings.weight.data_ptr()
    )


def test_question_answering_export_matches(long_models, tmp_path):
    model = long_models["qa"]
    export.export_model(model, tmp_path, head="qa")
    reference = load_with_info(transformers.AutoModelForQuestionAnswering, tmp_path)
    ids, mask, flags = global_input()

    ours = forward(model, input_ids=ids, attention_mask=mask, global_attention_mask=flags)
    theirs = torch_outputs(
        reference, input_ids=ids, attention_mask=mask, global_attention_mask=flags
    )

    assert type(reference).__name__ == "LongformerForQuestionAnswering"
    np.testing.assert_allclose(
        np.asarray(ours.start_logits), theirs.start_logits.numpy(), atol=ATOL
    )
    np.testing.assert_allclose(np.asarray(ours.end_logits), theirs.end_logits.numpy(), atol=ATOL)


def test_encoder_export_matches(long_models, tmp_path):
    model = long_models["mlm"]
    export.export_model(model, tmp_path, head="none")
    # The source has no pooler: the export adds a newly initialised one for AutoModel.
    reference = load_with_info(transformers.AutoModel, tmp_path)
    ids, mask, flags = global_input()

    ours = forward(model, input_ids=ids, attention_mask=mask, global_attention_mask=flags)
    theirs = torch_outputs(
        reference, input_ids=ids, attention_mask=mask, global_attention_mask=flags
    )

    assert type(reference).__name__ == "LongformerModel"
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state), theirs.last_hidden_state.numpy(), atol=ATOL
    )


def test_exported_config_fields(long_models, tmp_path):
    export.export_model(long_models["mlm"], tmp_path, head="mlm")
    config = json.loads((tmp_path / "config.json").read_text())

    assert config["model_type"] == "longformer"
    assert config["architectures"] == ["LongformerForMaskedLM"]
    assert config["type_vocab_size"] == 1
    assert config["layer_norm_eps"] == 1e-5
    assert config["pad_token_id"] == 1
    assert config["max_position_embeddings"] == MAX_LENGTH + 2
    assert config["attention_window"] == [WINDOW, WINDOW]
    assert len(config["attention_window"]) == config["num_hidden_layers"]


def test_exported_global_projections_are_separate(long_models, tmp_path):
    export.export_model(long_models["mlm"], tmp_path, head="mlm")
    reference = load_with_info(transformers.AutoModelForMaskedLM, tmp_path)
    attention = reference.longformer.encoder.layer[0].attention.self

    torch.testing.assert_close(
        attention.query_global.weight, attention.query.weight, rtol=0, atol=0
    )
    before = attention.query.weight.detach().clone()
    with torch.no_grad():
        attention.query_global.weight.add_(1.0)
    torch.testing.assert_close(attention.query.weight, before, rtol=0, atol=0)


def test_head_not_in_checkpoint_rejected(long_models, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"The checkpoint has head 'mlm'; it can be exported with --head mlm or --head none",
    ):
        export.export_model(long_models["mlm"], tmp_path, head="qa")


# ----------------------------------------------------------------------------------------------
# Full-attention and BERT-family exports


def test_full_attention_export_loads_as_source_family(xlmr_directory, tmp_path):
    source, _ = longflax.load(xlmr_directory)
    export.export_model(source, tmp_path / "mlm", head="mlm")
    export.export_model(source, tmp_path / "none", head="none")
    ids, mask = random_ids(1, 20, seed=31)
    ours = forward(source, input_ids=ids, attention_mask=mask)

    config = json.loads((tmp_path / "mlm" / "config.json").read_text())
    assert config["model_type"] == "xlm-roberta"
    assert config["max_position_embeddings"] == 130

    masked_lm = load_with_info(transformers.RobertaForMaskedLM, tmp_path / "mlm")
    theirs = torch_outputs(masked_lm, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(ours.logits), theirs.logits.numpy(), atol=ATOL)

    encoder = load_with_info(transformers.XLMRobertaModel, tmp_path / "none")
    theirs = torch_outputs(encoder, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state), theirs.last_hidden_state.numpy(), atol=ATOL
    )


def test_long_bert_export_loads_as_longformer(tmp_path):
    make_hf_model("BertModel", tmp_path / "bert", seed=32)
    source, _ = longflax.load(tmp_path / "bert")
    model, config = convert.convert_to_long(source, max_length=MAX_LENGTH, attention_window=WINDOW)
    export.export_model(model, tmp_path / "export", head="none")
    reference = load_with_info(transformers.AutoModel, tmp_path / "export")

    ids, mask = random_ids(2, 37, seed=32, pad_tail=(0, 6), pad_id=0)
    ids[:, 0] = 101
    types = np.zeros_like(ids)
    types[:, 10:] = 1
    types[mask == 0] = 0
    flags = np.zeros_like(ids)
    flags[:, 0] = 1
    inputs = dict(
        input_ids=ids, attention_mask=mask, token_type_ids=types, global_attention_mask=flags
    )
    ours = forward(model, **inputs)
    theirs = torch_outputs(reference, **inputs)

    assert type(reference).__name__ == "LongformerModel"
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["type_vocab_size"] == 2
    assert exported["pad_token_id"] == 0
    # BERT numbers tokens from 0 and Longformer from pad_token_id + 1, so one row is prepended.
    assert exported["max_position_embeddings"] == config.max_position_embeddings + 1
    real = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours.last_hidden_state)[real], theirs.last_hidden_state.numpy()[real], atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(ours.pooler_output), theirs.pooler_output.numpy(), atol=ATOL
    )


# ----------------------------------------------------------------------------------------------
# Command line


@pytest.fixture(scope="module")
def saved_long_model(long_models, tmp_path_factory):
    """A run directory whose `qa` stage holds a saved long QA model."""
    workdir = tmp_path_factory.mktemp("run")
    model_io.save_model(workdir / "qa" / "model", long_models["qa"], head="qa")
    return workdir


@pytest.mark.parametrize("where", ["model", "stage", "run"])
def test_cli_exports(saved_long_model, tmp_path, capsys, where):
    checkpoint = {
        "model": saved_long_model / "qa" / "model",
        "stage": saved_long_model / "qa",
        "run": saved_long_model,
    }[where]
    status = export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "hf")])

    printed = capsys.readouterr().out
    assert status == 0
    assert "model_type:  longformer (LongformerForQuestionAnswering)" in printed
    assert f"positions:   {MAX_LENGTH + 2}" in printed
    load_with_info(transformers.AutoModelForQuestionAnswering, tmp_path / "hf")


def test_cli_exports_encoder_only(saved_long_model, tmp_path, capsys):
    status = export.main(
        [
            "--checkpoint",
            str(saved_long_model / "qa"),
            "--output",
            str(tmp_path / "hf"),
            "--head",
            "none",
        ]
    )
    assert status == 0
    assert "model_type:  longformer (LongformerModel)" in capsys.readouterr().out
    load_with_info(transformers.AutoModel, tmp_path / "hf")


def test_cli_path_without_model(tmp_path, capsys):
    status = export.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf")])
    assert status == 2
    message = capsys.readouterr().err
    assert f"error: no longflax model found at {tmp_path}" in message
    assert "pass the stage directory, whose model/ folder holds the final weights" in message
    assert not (tmp_path / "hf").exists()


def test_cli_wrong_head(saved_long_model, tmp_path, capsys):
    status = export.main(
        ["--checkpoint", str(saved_long_model), "--output", str(tmp_path / "hf"), "--head", "mlm"]
    )
    assert status == 2
    assert (
        "error: The checkpoint has head 'qa'; it can be exported with --head qa or --head none"
        in (capsys.readouterr().err)
    )
