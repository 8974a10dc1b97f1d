"""Tiny Hugging Face PyTorch models built locally from small configs (never downloaded)."""

from __future__ import annotations

import pathlib

import numpy as np

TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    # Not equal to hidden_size, so a transposed kernel cannot go unnoticed.
    intermediate_size=48,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def make_hf_model(kind: str, directory: pathlib.Path, *, seed: int = 0, **overrides):
    """Build, randomise and save a tiny transformers model; return the torch model (eval mode).

    kind is a transformers class name such as "RobertaForMaskedLM" or "LongformerForQuestionAnswering".
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    family = {
        "Roberta": "RobertaConfig",
        "XLMRoberta": "XLMRobertaConfig",
        "Bert": "BertConfig",
        "Longformer": "LongformerConfig",
    }
    prefix = next(p for p in sorted(family, key=len, reverse=True) if kind.startswith(p))
    settings = dict(TINY, max_position_embeddings=130 if prefix != "Bert" else 128)
    if prefix == "Longformer":
        settings["attention_window"] = 8
        settings["sep_token_id"] = 2
    if prefix == "Bert":
        settings.update(pad_token_id=0, type_vocab_size=2)
    settings.update(overrides)
    config = getattr(transformers, family[prefix])(**settings)
    model = getattr(transformers, kind)(config)
    with torch.no_grad():
        # Random LayerNorm and bias values, so that a wrong mapping cannot hide behind ones/zeros.
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                param.copy_(
                    torch.randn(param.shape, generator=generator) * 0.1
                    + (1.0 if name.endswith("weight") else 0.0)
                )
    model.eval()
    model.save_pretrained(str(directory))
    return model


def torch_outputs(model, **inputs):
    import torch

    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


def random_ids(
    batch: int, length: int, *, vocab: int = 1000, seed: int = 0, pad_tail=(), pad_id: int = 1
):
    """Random token ids in [3, vocab) with `<s>` first; `pad_tail[i]` pads the end of row i."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, size=(batch, length))
    ids[:, 0] = 0
    mask = np.ones_like(ids)
    for row, count in enumerate(pad_tail):
        if count:
            ids[row, -count:] = pad_id
            mask[row, -count:] = 0
    return ids, mask
