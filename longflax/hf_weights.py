"""Hugging Face checkpoints in and out: one declarative name table for BERT, RoBERTa, XLM-R and Longformer.

Source keys are first reduced to a canonical PyTorch-style name without the base-model prefix
(`bert.`, `roberta.`, `longformer.`); `NAME_TABLE` then maps each canonical name to a path in
the longflax parameter tree. PyTorch `Linear` weights are [out, in] and longflax kernels are
[in, out], so those are transposed both ways.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from longflax.modeling.config import ModelConfig

# (canonical-name pattern, longflax path template, transpose). `{i}` is a layer index.
NAME_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", False),
    ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", False),
    ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", False),
    ("embeddings.LayerNorm.weight", "embeddings/layer_norm/scale", False),
    ("embeddings.LayerNorm.bias", "embeddings/layer_norm/bias", False),
    *(
        (f"encoder.layer.{{i}}.attention.self.{name}.{kind}", f"layers/{{i}}/attention/{name}/{target}", kind == "weight")
        for name in ("query", "key", "value", "query_global", "key_global", "value_global")
        for kind, target in (("weight", "kernel"), ("bias", "bias"))
    ),
    ("encoder.layer.{i}.attention.output.dense.weight", "layers/{i}/attention/output/kernel", True),
    ("encoder.layer.{i}.attention.output.dense.bias", "layers/{i}/attention/output/bias", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.weight", "layers/{i}/attention/output_norm/scale", False),
    ("encoder.layer.{i}.attention.output.LayerNorm.bias", "layers/{i}/attention/output_norm/bias", False),
    ("encoder.layer.{i}.intermediate.dense.weight", "layers/{i}/intermediate/kernel", True),
    ("encoder.layer.{i}.intermediate.dense.bias", "layers/{i}/intermediate/bias", False),
    ("encoder.layer.{i}.output.dense.weight", "layers/{i}/output/kernel", True),
    ("encoder.layer.{i}.output.dense.bias", "layers/{i}/output/bias", False),
    ("encoder.layer.{i}.output.LayerNorm.weight", "layers/{i}/output_norm/scale", False),
    ("encoder.layer.{i}.output.LayerNorm.bias", "layers/{i}/output_norm/bias", False),
    ("pooler.dense.weight", "pooler/kernel", True),
    ("pooler.dense.bias", "pooler/bias", False),
    ("lm_head.dense.weight", "lm_head/dense/kernel", True),
    ("lm_head.dense.bias", "lm_head/dense/bias", False),
    ("lm_head.layer_norm.weight", "lm_head/layer_norm/scale", False),
    ("lm_head.layer_norm.bias", "lm_head/layer_norm/bias", False),
    ("lm_head.bias", "lm_head/bias", False),
    ("qa_outputs.weight", "qa_outputs/kernel", True),
    ("qa_outputs.bias", "qa_outputs/bias", False),
)

# BERT names its masked-LM head differently; these are renamed to the RoBERTa names first.
BERT_HEAD_RENAMES = (
    ("cls.predictions.transform.dense.", "lm_head.dense."),
    ("cls.predictions.transform.LayerNorm.", "lm_head.layer_norm."),
    ("cls.predictions.decoder.", "lm_head.decoder."),
    ("cls.predictions.bias", "lm_head.bias"),
)

# Tensors that carry no information of their own: buffers, and the tied decoder copies.
IGNORED_KEYS = re.compile(
    r"(^|\.)(position_ids|token_type_ids)$|^lm_head\.decoder\.(weight|bias)$|^cls\.seq_relationship\."
)

BASE_PREFIXES = ("bert.", "roberta.", "longformer.", "xlm_roberta.", "model.")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "flax_model.msgpack")


def _compile_table() -> list[tuple[re.Pattern, str, bool]]:
    compiled = []
    for pattern, template, transpose in NAME_TABLE:
        regex = "^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
        compiled.append((re.compile(regex), template, transpose))
    return compiled


_TABLE = _compile_table()


def canonical_name(key: str) -> str:
    """Strip the base-model prefix and apply legacy and BERT renames."""
    for prefix in BASE_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    for old, new in BERT_HEAD_RENAMES:
        if key.startswith(old):
            key = new + key[len(old) :]
    # Checkpoints from old TensorFlow conversions name LayerNorm parameters gamma and beta.
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    return key


def lookup(canonical: str) -> tuple[str, bool] | None:
    """Return (longflax path, transpose) for a canonical name, or None if it is not in the table."""
    for regex, template, transpose in _TABLE:
        match = regex.match(canonical)
        if match:
            return template.format(**match.groupdict()), transpose
    return None


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def _read_msgpack(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Flatten a Flax msgpack checkpoint into PyTorch-style names and layouts."""
    from flax import serialization

    tree = serialization.msgpack_restore(path.read_bytes())
    tree = tree.get("params", tree)
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: list[str]) -> None:
        if isinstance(node, Mapping):
            for name, child in node.items():
                walk(child, prefix + [str(name)])
            return
        *parents, leaf = prefix
        array = np.asarray(node)
        if leaf == "kernel":
            array, leaf = array.T, "weight"
        elif leaf in ("embedding", "scale"):
            leaf = "weight"
        flat[".".join(parents + [leaf])] = array

    walk(tree, [])
    return flat


def read_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """Read the weights of a Hugging Face model directory as float32 numpy arrays."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.exists():
            continue
        if name.endswith(".safetensors"):
            from safetensors.numpy import load_file

            try:
                tensors = load_file(str(path))
            except (TypeError, ValueError):
                # bfloat16 tensors are not representable in numpy; read them through torch.
                from safetensors.torch import load_file as load_torch

                tensors = {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
            return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in tensors.items()}
        if name.endswith(".bin"):
            try:
                import torch
            except ImportError as error:
                raise ValueError(
                    f"{path} is a PyTorch pickle; install torch (pip install 'longflax[torch]') "
                    "to read it, or convert it to model.safetensors."
                ) from error
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
        return _read_msgpack(path)
    sharded = sorted(directory.glob("model-*.safetensors"))
    if sharded:
        from safetensors.numpy import load_file

        tensors: dict[str, np.ndarray] = {}
        for path in sharded:
            tensors.update(load_file(str(path)))
        return tensors
    raise ValueError(
        f"No weights found in {directory}: expected one of {', '.join(WEIGHT_FILES)} "
        "(or sharded model-*.safetensors)."
    )


def model_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face `config.json` mapping, keeping the source's own values."""
    model_type = hf_config.get("model_type", "")
    families = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "xlm-roberta", "longformer": "longformer"}
    if model_type not in families:
        raise ValueError(
            f"model_type={model_type!r} is not supported; longflax reads {sorted(families)} checkpoints."
        )
    fields: dict[str, Any] = dict(
        family=families[model_type],
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=hf_config["num_attention_heads"],
        mlp_dim=hf_config["intermediate_size"],
        max_position_embeddings=hf_config["max_position_embeddings"],
        type_vocab_size=hf_config.get("type_vocab_size", 2),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
        pad_token_id=hf_config.get("pad_token_id", 0) if hf_config.get("pad_token_id") is not None else 0,
        bos_token_id=hf_config.get("bos_token_id"),
        eos_token_id=hf_config.get("eos_token_id"),
        sep_token_id=hf_config.get("sep_token_id", hf_config.get("eos_token_id") or 102),
        hidden_act=hf_config.get("hidden_act", "gelu"),
        dropout_rate=hf_config.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=hf_config.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf_config.get("initializer_range", 0.02),
    )
    if model_type == "longformer":
        window = hf_config.get("attention_window", 512)
        fields.update(attention="longformer", attention_window=window)
    if model_type == "bert" and "sep_token_id" not in hf_config:
        # BERT configs rarely store the separator id; [SEP] is 102 in the standard vocabularies.
        fields["sep_token_id"] = 102
    fields.update(overrides)
    return ModelConfig(**fields)


def head_in_state_dict(state_dict: Mapping[str, np.ndarray]) -> str:
    """Return the head the checkpoint contains: "mlm", "qa" or "none"."""
    names = {canonical_name(k) for k in state_dict}
    if any(n.startswith("qa_outputs.") for n in names):
        return "qa"
    if any(n.startswith("lm_head.") for n in names):
        return "mlm"
    return "none"


def map_state_dict(
    state_dict: Mapping[str, np.ndarray], *, head: str, has_pooler: bool
) -> dict[str, np.ndarray]:
    """Translate a PyTorch-style state dict into longflax paths.

    Raises:
        ValueError: listing every source tensor the table does not know.
    """
    prefix = "" if head == "none" else "encoder/"
    mapped: dict[str, np.ndarray] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        name = canonical_name(key)
        if IGNORED_KEYS.search(name):
            continue
        target = lookup(name)
        if target is None:
            unknown.append(key)
            continue
        path, transpose = target
        if path.startswith(("lm_head/", "qa_outputs/")):
            if not path.startswith({"mlm": "lm_head/", "qa": "qa_outputs/"}.get(head, "-")):
                logging.info("Dropping %s: the model is built with head=%r.", key, head)
                continue
        elif path.startswith("pooler/"):
            if not has_pooler:
                logging.info("Dropping %s: the model is built without a pooler.", key)
                continue
            path = prefix + path
        else:
            path = prefix + path
        mapped[path] = np.asarray(value.T if transpose else value)
    if unknown:
        raise ValueError(
            f"{len(unknown)} checkpoint tensors have no place in the model: {unknown[:10]}"
            + (" ..." if len(unknown) > 10 else "")
            + ". The checkpoint is not a BERT, RoBERTa, XLM-R or Longformer encoder, or it has "
            "a head longflax does not support."
        )
    return mapped


def check_tied_decoder(state_dict: Mapping[str, np.ndarray]) -> None:
    """The masked-LM decoder must be the word-embedding matrix and its bias the head bias."""
    names = {canonical_name(k): k for k in state_dict}
    words = names.get("embeddings.word_embeddings.weight")
    decoder = names.get("lm_head.decoder.weight")
    if words is not None and decoder is not None:
        if state_dict[decoder].shape != state_dict[words].shape or not np.allclose(
            state_dict[decoder], state_dict[words]
        ):
            raise ValueError(
                f"{decoder} differs from {words}: longflax ties the masked-LM decoder to the word "
                "embeddings and cannot load an untied decoder."
            )
    bias = names.get("lm_head.bias")
    decoder_bias = names.get("lm_head.decoder.bias")
    if bias is None and decoder_bias is not None:
        raise ValueError(f"{decoder_bias} is present but lm_head.bias is missing; cannot place the head bias.")
    if bias is not None and decoder_bias is not None and not np.allclose(state_dict[bias], state_dict[decoder_bias]):
        raise ValueError(f"{decoder_bias} differs from {bias}; the head bias must be applied exactly once.")


def load_hf_directory(directory: str | pathlib.Path) -> tuple[ModelConfig, dict[str, np.ndarray], str]:
    """Read `config.json` and the weights of a local Hugging Face model directory.

    Returns:
      The model config, the state dict (PyTorch names and layouts) and the head it carries.
    """
    directory = pathlib.Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ValueError(f"{config_path} not found: not a Hugging Face model directory.")
    hf_config = json.loads(config_path.read_text())
    state_dict = read_state_dict(directory)
    # Checkpoints from transformers 3.x store an all-positions buffer; it is not a weight.
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED_KEYS.search(canonical_name(k)) or "decoder" in k}
    config = model_config_from_hf(hf_config, add_pooler=any(canonical_name(k).startswith("pooler.") for k in state_dict))
    check_tied_decoder(state_dict)
    return config, state_dict, head_in_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------
# Filling a model and writing a Hugging Face directory


def flat_params(model) -> dict[str, Any]:
    """Map "a/b/c" paths to the `nnx.Param` variables of a model."""
    from flax import nnx

    state = nnx.state(model, nnx.Param)
    return {"/".join(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def assign_params(model, mapped: Mapping[str, np.ndarray], *, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Copy mapped arrays into the model's parameters.

    Args:
      model: an NNX model from `build_model`.
      mapped: arrays keyed by longflax path (see `map_state_dict`).
      allow_missing: path prefixes that may stay at their random initialisation (a new head).

    Returns:
      The paths left at their initial values.

    Raises:
      ValueError: on a shape mismatch, a mapped array without a parameter, or an unfilled
        parameter outside `allow_missing`; each names the paths.
    """
    import jax.numpy as jnp
    from flax import nnx

    params = flat_params(model)
    extra = sorted(set(mapped) - set(params))
    if extra:
        raise ValueError(f"Checkpoint tensors without a model parameter: {extra[:10]}.")
    mismatched = [
        f"{path}: checkpoint {tuple(mapped[path].shape)} vs model {tuple(params[path].shape)}"
        for path in mapped
        if tuple(mapped[path].shape) != tuple(params[path].shape)
    ]
    if mismatched:
        raise ValueError("Shape mismatch between checkpoint and model: " + "; ".join(mismatched[:10]))
    missing = sorted(set(params) - set(mapped))
    not_allowed = [p for p in missing if not p.startswith(allow_missing)]
    if not_allowed:
        raise ValueError(f"Model parameters not found in the checkpoint: {not_allowed[:10]}.")
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        name = "/".join(str(p) for p in path)
        if name in mapped:
            var.set_value(jnp.asarray(mapped[name], var.get_value().dtype))
    nnx.update(model, state)
    return missing


HF_MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "xlm-roberta", "longformer": "longformer"}
HF_BASE_PREFIX = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "longformer": "longformer"}
HF_CLASS_PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "longformer": "Longformer"}


def hf_config_for_export(config: ModelConfig, head: str) -> dict[str, Any]:
    """Build the `config.json` content for a Hugging Face export of this model.

    Long models export as `model_type: longformer`; full-attention models as their source
    family. Every field comes from the model, never from Hugging Face defaults (whose
    `type_vocab_size=2` and `layer_norm_eps=1e-12` are wrong for RoBERTa and XLM-R).
    """
    family = "longformer" if config.attention == "longformer" else config.family
    class_prefix = HF_CLASS_PREFIX[family]
    architecture = {"mlm": "ForMaskedLM", "qa": "ForQuestionAnswering", "none": "Model"}[head]
    out: dict[str, Any] = {
        "model_type": HF_MODEL_TYPES[family],
        "architectures": [class_prefix + architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "max_position_embeddings": config.max_position_embeddings + _position_shift(config),
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "sep_token_id": config.sep_token_id,
        "hidden_act": config.hidden_act,
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": True,
    }
    if family == "longformer":
        out["attention_window"] = list(config.attention_window)
    if head == "qa":
        out["num_labels"] = 2
    return out


def _position_shift(config: ModelConfig) -> int:
    """Rows prepended to the position table on export.

    Hugging Face Longformer numbers real tokens from pad_token_id + 1. A long model of the BERT
    family numbers them from 0, so its table is exported shifted by pad_token_id + 1 rows;
    with right padding every real token then reads the same row as in longflax.
    """
    if config.attention == "longformer" and config.position_scheme == "absolute":
        return config.pad_token_id + 1
    return 0


def export_state_dict(model, config: ModelConfig, head: str) -> dict[str, np.ndarray]:
    """Build the PyTorch state dict (names, [out, in] layouts) of the model and head."""
    family = "longformer" if config.attention == "longformer" else config.family
    base = HF_BASE_PREFIX[family]
    reverse = {}
    for canonical, template, transpose in NAME_TABLE:
        reverse[template] = (canonical, transpose)
    out: dict[str, np.ndarray] = {}
    for path, var in flat_params(model).items():
        inner = path[len("encoder/") :] if path.startswith("encoder/") else path
        if inner.startswith("pooler/") and head != "none":
            # The Hugging Face masked-LM and QA classes have no pooler, so exporting it would
            # load as unexpected keys.
            continue
        generic = re.sub(r"^layers/\d+/", "layers/{i}/", inner)
        canonical, transpose = reverse[generic]
        match = re.match(r"^layers/(\d+)/", inner)
        if match:
            canonical = canonical.replace("{i}", match.group(1))
        value = np.asarray(var[...], np.float32)
        value = np.ascontiguousarray(value.T if transpose else value)
        if inner == "embeddings/position_embeddings/embedding" and _position_shift(config):
            value = np.concatenate([np.repeat(value[:1], _position_shift(config), axis=0), value])
        is_head = canonical.startswith(("lm_head.", "qa_outputs."))
        if family == "bert" and canonical.startswith("lm_head."):
            for new, old in ((n, o) for o, n in BERT_HEAD_RENAMES):
                if canonical.startswith(new):
                    canonical = old + canonical[len(new) :]
                    break
            is_head = True
        if head == "none" and not is_head:
            out[canonical] = value
        else:
            out[canonical if is_head else f"{base}.{canonical}"] = value
    if head == "mlm":
        # transformers 4.x ties lm_head.decoder.bias to lm_head.bias and 5.x declares both as
        # tied; writing the decoder copies too leaves nothing to be re-initialised by either.
        words_key = "embeddings.word_embeddings.weight"
        words = out[f"{base}.{words_key}"]
        if family == "bert":
            out["cls.predictions.decoder.weight"] = words.copy()
            out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"].copy()
        else:
            out["lm_head.decoder.weight"] = words.copy()
            out["lm_head.decoder.bias"] = out["lm_head.bias"].copy()
    if head == "none" and "pooler.dense.weight" not in out:
        # transformers' AutoModel always builds a pooler. A model without one (masked-LM and QA
        # sources) gets a newly initialised pooler here, drawn the way transformers initialises
        # it, so the export loads with no missing keys. No longflax head reads the pooler.
        logging.info("Exporting a newly initialised pooler: the model has none.")
        hidden = config.hidden_size
        rng = np.random.default_rng(0)
        out["pooler.dense.weight"] = (rng.standard_normal((hidden, hidden)) * config.initializer_range).astype(np.float32)
        out["pooler.dense.bias"] = np.zeros((hidden,), np.float32)
    return out
