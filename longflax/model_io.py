"""Model directories: load from Hugging Face or longflax, save longflax model directories.

A longflax model directory holds:
  longflax_model.json  the `ModelConfig`, the head and free-form metadata;
  params/              an Orbax checkpoint of the parameters (float32);
  tokenizer/           the tokenizer, saved with `save_pretrained` (optional).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from longflax import hf_weights
from longflax.modeling.config import ModelConfig
from longflax.modeling.encoder import HEADS, build_model

MODEL_FILE = "longflax_model.json"
HEAD_PREFIXES = {"mlm": ("lm_head/",), "qa": ("qa_outputs/",), "none": ()}


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not supported; use one of {sorted(HEADS)}.")


def _reheaded_params(mapped: dict[str, np.ndarray], old_head: str, new_head: str) -> dict[str, np.ndarray]:
    """Move parameter paths between the bare encoder layout and a with-head layout."""
    encoder = {
        (k[len("encoder/") :] if k.startswith("encoder/") else k): v
        for k, v in mapped.items()
        if not k.startswith(("lm_head/", "qa_outputs/"))
    }
    if new_head == "none":
        return encoder
    out = {f"encoder/{k}": v for k, v in encoder.items()}
    if new_head == old_head:
        out.update({k: v for k, v in mapped.items() if k.startswith(HEAD_PREFIXES[new_head])})
    return out


def model_from_arrays(
    config: ModelConfig, mapped: dict[str, np.ndarray], *, head: str, source_head: str, seed: int = 0
) -> nnx.Module:
    """Build a model and fill it; a head the source lacks is randomly initialised (logged)."""
    mapped = _reheaded_params(mapped, source_head, head)
    abstract = nnx.eval_shape(lambda: build_model(config, head, seed=seed))
    if set(hf_weights.flat_params(abstract)) <= set(mapped):
        # Every parameter comes from the checkpoint: skip the random initialisation, which
        # for a 250k-token vocabulary costs seconds and a second copy of the embeddings.
        model = abstract
    else:
        model = build_model(config, head, seed=seed)
    # Only a head the source lacks entirely may start at random; a partial head is an error.
    head_prefixes = HEAD_PREFIXES[head]
    source_has_head = bool(head_prefixes) and any(k.startswith(head_prefixes) for k in mapped)
    allow_missing = () if source_has_head else head_prefixes
    missing = hf_weights.assign_params(model, mapped, allow_missing=allow_missing)
    if missing:
        logging.warning(
            "The checkpoint has no %s head; %d head parameters are newly initialised: %s",
            head,
            len(missing),
            missing,
        )
    return model


def _resolve_hf_source(source: str) -> pathlib.Path:
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ValueError(f"{source} is not a model directory (no such directory, and not a hub id).")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise ValueError(f"{source} is not a local directory and huggingface_hub is not installed.") from error
    try:
        return pathlib.Path(
            snapshot_download(
                source,
                allow_patterns=["config.json", "*.safetensors", "*.json", "*.txt", "*.model", "pytorch_model.bin"],
            )
        )
    except Exception as error:  # noqa: BLE001 - hub errors have many types; all mean "not available"
        raise ValueError(
            f"Could not find {source!r} locally or download it from the Hugging Face hub ({error}). "
            "Pass a local directory, or connect to the internet."
        ) from error


def load_tokenizer(directory: pathlib.Path):
    """Load a fast tokenizer from a directory, or return None when it holds none."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")
    if not any((directory / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def find_model_directory(path: str | pathlib.Path) -> pathlib.Path | None:
    """Return the longflax model directory at `path`, inside a stage directory, or in a workdir."""
    path = pathlib.Path(path)
    candidates = [path, path / "model"]
    candidates += [path / stage / "model" for stage in ("export", "qa", "mlm", "convert")]
    for candidate in candidates:
        if (candidate / MODEL_FILE).exists():
            return candidate
    return None


def save_model(
    directory: str | pathlib.Path,
    model: nnx.Module,
    *,
    head: str,
    tokenizer: Any = None,
    metadata: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write a longflax model directory (config, Orbax parameters, tokenizer)."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    params = {path: np.asarray(var[...]) for path, var in hf_weights.flat_params(model).items()}
    nested: dict[str, Any] = {}
    for path, value in params.items():
        node = nested
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    target = directory / "params"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, nested, force=True)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
    record = {"format_version": 1, "head": head, "config": model.config.to_dict(), "metadata": metadata or {}}
    (directory / MODEL_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return directory


def read_model_record(directory: pathlib.Path) -> dict[str, Any]:
    return json.loads((directory / MODEL_FILE).read_text())


def load_model(directory: str | pathlib.Path, *, head: str | None = None) -> tuple[nnx.Module, str]:
    """Load a longflax model directory; `head` overrides the stored head."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    record = read_model_record(directory)
    config = ModelConfig.from_dict(record["config"])
    stored_head = record["head"]
    head = head or stored_head
    _check_head(head)
    with jax.default_device(jax.devices("cpu")[0]):
        restored = ocp.StandardCheckpointer().restore(directory / "params")
    flat: dict[str, np.ndarray] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{prefix}{key}/")
        else:
            flat[prefix[:-1]] = np.asarray(node)

    walk(restored, "")
    model = model_from_arrays(config, flat, head=head, source_head=stored_head)
    return model, head


def load(
    source: str | os.PathLike, *, head: str | None = None, **config_overrides: Any
) -> tuple[nnx.Module, Any]:
    """Load a model and its tokenizer from a longflax directory, a Hugging Face directory or a hub id.

    Args:
      source: a longflax model directory (or a run/stage directory containing one), a local
        Hugging Face model directory, or a hub id such as "xlm-roberta-base" (needs internet).
      head: "mlm", "qa" or "none"; defaults to the head stored in the checkpoint. A head the
        checkpoint lacks is newly initialised, with a warning.
      **config_overrides: `ModelConfig` fields to change when reading a Hugging Face
        checkpoint (for example `dtype="bfloat16"`).

    Returns:
      (model, tokenizer); the tokenizer is None when the source has none.
    """
    if head is not None:
        _check_head(head)
    own = find_model_directory(source) if pathlib.Path(source).exists() else None
    if own is not None:
        if config_overrides:
            raise ValueError("config overrides apply to Hugging Face checkpoints only.")
        model, _ = load_model(own, head=head)
        tokenizer_dir = own / "tokenizer"
        return model, load_tokenizer(tokenizer_dir) if tokenizer_dir.exists() else None
    directory = _resolve_hf_source(str(source))
    config, state_dict, source_head = hf_weights.load_hf_directory(directory)
    if config_overrides:
        config = config.replace(**config_overrides)
    head = head or source_head
    mapped = hf_weights.map_state_dict(state_dict, head=source_head, has_pooler=config.add_pooler)
    model = model_from_arrays(config, mapped, head=head, source_head=source_head)
    return model, load_tokenizer(directory)
