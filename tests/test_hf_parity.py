"""Parity of longflax with the Hugging Face PyTorch classes, and checkpoint loading errors.

Every reference model is a tiny transformers model built and saved locally (see hf_models.py);
longflax loads the saved directory and must reproduce the PyTorch outputs in float32 on every
non-padding position.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_hf_model, random_ids, torch_outputs

import longflax

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

ATOL = 1e-4


@nnx.jit
def _forward(model, inputs):
    return model(**inputs)


def forward(model, **inputs):
    return _forward(
        model, {name: jnp.asarray(value) for name, value in inputs.items() if value is not None}
    )


def max_diff_on_real(ours, theirs, mask):
    """Largest |ours - theirs| over positions where `mask` is 1."""
    ours = np.asarray(ours)
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    real = np.asarray(mask).astype(bool)
    return float(np.max(np.abs(ours[real] - theirs[real])))


def load(directory, **kwargs):
    model, _ = longflax.load(directory, **kwargs)
    return model


def qa_ids(question_lengths, length, *, seed=0):
    """`<s> q.. </s></s> c.. </s>` rows, right-padded to `length`, with exactly three separators."""
    rng = np.random.default_rng(seed)
    ids = np.ones((len(question_lengths), length), np.int64)
    mask = np.zeros_like(ids)
    for row, question in enumerate(question_lengths):
        context = length - question - 4 - 2 * row
        tokens = [0, *rng.integers(3, 1000, question), 2, 2, *rng.integers(3, 1000, context), 2]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Full-attention source models


def test_roberta_masked_lm_with_distinctive_bias(tmp_path):
    reference = make_hf_model("RobertaForMaskedLM", tmp_path)
    with torch.no_grad():
        # b[v] = 0.01 v: a bias applied twice, or not at all, shows an error of exactly b.
        reference.lm_head.bias.copy_(0.01 * torch.arange(1000, dtype=torch.float32))
    reference.save_pretrained(str(tmp_path))
    ids, mask = random_ids(2, 20, pad_tail=(0, 5))

    ours = forward(load(tmp_path), input_ids=ids, attention_mask=mask)
    theirs = torch_outputs(reference, input_ids=ids, attention_mask=mask)

    assert max_diff_on_real(ours.logits, theirs.logits, mask) <= ATOL


def test_xlm_roberta_question_answering(tmp_path):
    reference = make_hf_model("XLMRobertaForQuestionAnswering", tmp_path, seed=1)
    ids, mask = random_ids(2, 24, seed=1, pad_tail=(3, 0))

    ours = forward(load(tmp_path), input_ids=ids, attention_mask=mask)
    theirs = torch_outputs(reference, input_ids=ids, attention_mask=mask)

    assert max_diff_on_real(ours.start_logits, theirs.start_logits, mask) <= ATOL
    assert max_diff_on_real(ours.end_logits, theirs.end_logits, mask) <= ATOL


@pytest.mark.parametrize("kind", ["RobertaModel", "XLMRobertaModel"])
def test_base_model_right_padded_batch(tmp_path, kind):
    reference = make_hf_model(kind, tmp_path, seed=2)
    ids, mask = random_ids(3, 18, seed=2, pad_tail=(0, 4, 9))

    ours = forward(load(tmp_path), input_ids=ids, attention_mask=mask)
    theirs = torch_outputs(reference, input_ids=ids, attention_mask=mask)

    assert max_diff_on_real(ours.last_hidden_state, theirs.last_hidden_state, mask) <= ATOL
    np.testing.assert_allclose(
        np.asarray(ours.pooler_output), theirs.pooler_output.numpy(), atol=ATOL
    )


def test_bert_model_with_token_types(tmp_path):
    reference = make_hf_model("BertModel", tmp_path, seed=3)
    ids, mask = random_ids(2, 16, seed=3, pad_tail=(0, 5), pad_id=0)
    ids[:, 0] = 101
    types = np.zeros_like(ids)
    types[:, 6:] = 1
    types[mask == 0] = 0

    model = load(tmp_path)
    ours = forward(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    theirs = torch_outputs(reference, input_ids=ids, attention_mask=mask, token_type_ids=types)

    assert model.config.type_vocab_size == 2
    assert model.config.pad_token_id == 0
    assert max_diff_on_real(ours.last_hidden_state, theirs.last_hidden_state, mask) <= ATOL
    np.testing.assert_allclose(
        np.asarray(ours.pooler_output), theirs.pooler_output.numpy(), atol=ATOL
    )


# ----------------------------------------------------------------------------------------------
# Longformer source models (window 8)


@pytest.fixture(scope="module")
def longformer_mlm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("longformer_mlm")
    reference = make_hf_model("LongformerForMaskedLM", directory, seed=4)
    return reference, load(directory)


@pytest.mark.parametrize("length", [13, 21])
@pytest.mark.parametrize("with_globals", [False, True])
def test_longformer_masked_lm(longformer_mlm, length, with_globals):
    reference, model = longformer_mlm
    ids, mask = random_ids(2, length, seed=length, pad_tail=(0, 4))
    flags = None
    if with_globals:
        flags = np.zeros_like(ids)
        flags[:, 0] = 1
        flags[0, 5] = 1
        flags[1, [2, 3]] = 1

    ours = forward(model, input_ids=ids, attention_mask=mask, global_attention_mask=flags)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if flags is not None:
        inputs["global_attention_mask"] = flags
    theirs = torch_outputs(reference, **inputs)

    assert max_diff_on_real(ours.logits, theirs.logits, mask) <= ATOL


@pytest.fixture(scope="module")
def longformer_qa(tmp_path_factory):
    directory = tmp_path_factory.mktemp("longformer_qa")
    reference = make_hf_model("LongformerForQuestionAnswering", directory, seed=5)
    return reference, load(directory)


@pytest.mark.parametrize("with_globals", [False, True])
def test_longformer_question_answering(longformer_qa, with_globals):
    reference, model = longformer_qa
    ids, mask = qa_ids([3, 7], 21, seed=5)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if with_globals:
        flags = np.zeros_like(ids)
        flags[:, :2] = 1
        flags[1, 15] = 1
        inputs["global_attention_mask"] = flags

    # Without a global mask both sides put global attention on the tokens before the first
    # separator.
    ours = forward(model, **inputs)
    theirs = torch_outputs(reference, **inputs)

    assert max_diff_on_real(ours.start_logits, theirs.start_logits, mask) <= ATOL
    assert max_diff_on_real(ours.end_logits, theirs.end_logits, mask) <= ATOL


def test_longformer_config_read(longformer_mlm):
    _, model = longformer_mlm
    config = model.config
    assert config.attention == "longformer"
    assert config.attention_window == (8, 8)
    assert config.type_vocab_size == 1
    assert config.layer_norm_eps == 1e-5
    assert config.max_position_embeddings == 130


# ----------------------------------------------------------------------------------------------
# Loading errors


@pytest.fixture
def roberta_directory(tmp_path):
    make_hf_model("RobertaForMaskedLM", tmp_path, seed=6)
    return tmp_path


def rewrite_weights(directory: pathlib.Path, change) -> None:
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unknown_tensor_rejected(roberta_directory):
    name = "roberta.encoder.layer.0.attention.self.rotary.weight"
    rewrite_weights(roberta_directory, lambda t: t.update({name: np.zeros((4, 4), np.float32)}))
    with pytest.raises(
        ValueError, match=r"1 checkpoint tensors have no place in the model: \['" + name
    ):
        longflax.load(roberta_directory)


def test_missing_tensor_rejected(roberta_directory):
    rewrite_weights(roberta_directory, lambda t: t.pop("roberta.encoder.layer.1.output.dense.bias"))
    with pytest.raises(
        ValueError,
        match=r"Model parameters not found in the checkpoint: \['encoder/layers/1/output/bias'\]",
    ):
        longflax.load(roberta_directory)


def test_missing_head_tensor_rejected(roberta_directory):
    # A head that is present but incomplete must not be silently completed at random.
    rewrite_weights(roberta_directory, lambda t: t.pop("lm_head.dense.weight"))
    with pytest.raises(
        ValueError,
        match=r"Model parameters not found in the checkpoint: \['lm_head/dense/kernel'\]",
    ):
        longflax.load(roberta_directory)


def test_shape_mismatch_rejected(roberta_directory):
    key = "roberta.encoder.layer.0.intermediate.dense.weight"
    rewrite_weights(roberta_directory, lambda t: t.update({key: np.zeros((48, 31), np.float32)}))
    with pytest.raises(
        ValueError,
        match=r"encoder/layers/0/intermediate/kernel: checkpoint \(31, 48\) vs model \(32, 48\)",
    ):
        longflax.load(roberta_directory)


def test_missing_config_rejected(roberta_directory):
    (roberta_directory / "config.json").unlink()
    with pytest.raises(
        ValueError, match=r"config.json not found: not a Hugging Face model directory"
    ):
        longflax.load(roberta_directory)


def test_untied_decoder_rejected(roberta_directory):
    def untie(tensors):
        tensors["lm_head.decoder.weight"] = (
            tensors["roberta.embeddings.word_embeddings.weight"] + 1.0
        )

    rewrite_weights(roberta_directory, untie)
    with pytest.raises(
        ValueError,
        match=r"lm_head.decoder.weight differs from roberta.embeddings.word_embeddings.weight",
    ):
        longflax.load(roberta_directory)


def test_doubled_decoder_bias_rejected(roberta_directory):
    def shift(tensors):
        tensors["lm_head.decoder.bias"] = tensors["lm_head.bias"] + 1.0

    rewrite_weights(roberta_directory, shift)
    with pytest.raises(ValueError, match=r"lm_head.decoder.bias differs from lm_head.bias"):
        longflax.load(roberta_directory)


def test_missing_weights_rejected(roberta_directory):
    (roberta_directory / "model.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"No weights found in .*: expected one of model.safetensors"
    ):
        longflax.load(roberta_directory)


def test_unsupported_model_type_rejected(roberta_directory):
    config = json.loads((roberta_directory / "config.json").read_text())
    config["model_type"] = "gpt2"
    (roberta_directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported"):
        longflax.load(roberta_directory)


# ----------------------------------------------------------------------------------------------
# Checkpoint formats


def flax_layout(state_dict):
    """Nest a PyTorch state dict the way Hugging Face Flax checkpoints store it."""
    tree: dict = {}
    for key, value in state_dict.items():
        if key.startswith("lm_head.decoder.") or key.endswith("position_ids"):
            continue
        *parents, leaf = key.split(".")
        array = value.numpy()
        if leaf == "weight":
            if parents[-1].endswith("embeddings"):
                leaf = "embedding"
            elif parents[-1] in ("LayerNorm", "layer_norm"):
                leaf = "scale"
            else:
                leaf, array = "kernel", array.T
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array
    return tree


def test_checkpoint_formats_load_alike(tmp_path):
    from flax import serialization

    reference = make_hf_model("RobertaForMaskedLM", tmp_path / "safetensors", seed=7)
    config_text = (tmp_path / "safetensors" / "config.json").read_text()
    state_dict = reference.state_dict()
    # transformers 5.25 writes safetensors even with safe_serialization=False, so the pickle
    # is written directly, as older versions did.
    (tmp_path / "bin").mkdir()
    torch.save(state_dict, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "bin" / "config.json").write_text(config_text)
    for name, tree in (("msgpack", flax_layout(state_dict)), ("msgpack_params", None)):
        (tmp_path / name).mkdir()
        tree = tree if tree is not None else {"params": flax_layout(state_dict)}
        (tmp_path / name / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
        (tmp_path / name / "config.json").write_text(config_text)

    ids, mask = random_ids(2, 12, seed=7, pad_tail=(0, 3))
    theirs = torch_outputs(reference, input_ids=ids, attention_mask=mask)
    outputs = {}
    for name in ("safetensors", "bin", "msgpack", "msgpack_params"):
        outputs[name] = np.asarray(
            forward(load(tmp_path / name), input_ids=ids, attention_mask=mask).logits
        )
        assert max_diff_on_real(outputs[name], theirs.logits, mask) <= ATOL, name
    for name in ("bin", "msgpack", "msgpack_params"):
        np.testing.assert_array_equal(outputs[name], outputs["safetensors"], err_msg=name)
