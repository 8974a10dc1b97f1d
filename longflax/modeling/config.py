"""Model settings of the encoder family (BERT, RoBERTa, XLM-R and their long variants)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

AttentionKind = Literal["full", "longformer"]
PositionScheme = Literal["absolute", "padding_offset"]

# Source families and the position-id scheme each uses. RoBERTa-style models number real
# tokens from `pad_token_id + 1` and give padding the id `pad_token_id`; BERT numbers 0..L-1.
FAMILY_POSITION_SCHEME: dict[str, PositionScheme] = {
    "bert": "absolute",
    "roberta": "padding_offset",
    "xlm-roberta": "padding_offset",
    "longformer": "padding_offset",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Settings of one encoder.

    `attention_window` follows the Hugging Face Longformer convention: it is the full two-sided
    width, so each token attends to `attention_window[layer] // 2` tokens on each side (plus
    itself and every global token). It holds one even value per layer.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_position_embeddings: int
    family: str = "roberta"
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    sep_token_id: int = 2
    hidden_act: str = "gelu"
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    initializer_range: float = 0.02
    attention: AttentionKind = "full"
    attention_window: tuple[int, ...] = ()
    # Upper bound on global tokens per row. Global keys and queries go through this many
    # static slots, so the compiled shapes do not depend on the data.
    max_global_tokens: int = 64
    add_pooler: bool = False
    # "float32" or "bfloat16": matmuls run in this dtype; parameters, softmax and LayerNorm
    # statistics stay in float32.
    dtype: str = "float32"
    # Rematerialise each layer in the backward pass: "none", "full" or "dots" (save matmul
    # outputs only).
    remat: str = "none"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.attention_window, int):
            object.__setattr__(self, "attention_window", (self.attention_window,) * self.num_layers)
        elif isinstance(self.attention_window, Sequence):
            object.__setattr__(self, "attention_window", tuple(int(w) for w in self.attention_window))
        validate_model_config(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_scheme(self) -> PositionScheme:
        return FAMILY_POSITION_SCHEME[self.family]

    @property
    def position_offset(self) -> int:
        """Position id of the first real token: `pad_token_id + 1` for RoBERTa-style models."""
        return self.pad_token_id + 1 if self.position_scheme == "padding_offset" else 0

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position table can number, special tokens included."""
        return self.max_position_embeddings - self.position_offset

    @property
    def max_window(self) -> int:
        return max(self.attention_window) if self.attention_window else 0

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["attention_window"] = list(self.attention_window)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown model config fields {unknown}; known fields: {sorted(known)}.")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def validate_model_config(config: ModelConfig) -> None:
    """Check every cross-field rule of a model config.

    Raises:
        ValueError: naming the field, its value and the rule it breaks.
    """
    if config.family not in FAMILY_POSITION_SCHEME:
        raise ValueError(
            f"family={config.family!r} is not supported; use one of {sorted(FAMILY_POSITION_SCHEME)}."
        )
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
        if getattr(config, name) <= 0:
            raise ValueError(f"{name}={getattr(config, name)} must be positive.")
    if config.hidden_size % config.num_heads:
        raise ValueError(
            f"hidden_size={config.hidden_size} is not divisible by num_heads={config.num_heads}."
        )
    if config.max_position_embeddings <= config.position_offset:
        raise ValueError(
            f"max_position_embeddings={config.max_position_embeddings} leaves no usable position "
            f"after the offset {config.position_offset} of the {config.family} family."
        )
    if config.type_vocab_size < 1:
        raise ValueError(f"type_vocab_size={config.type_vocab_size} must be at least 1.")
    if config.hidden_act not in ("gelu", "gelu_new", "relu"):
        raise ValueError(f"hidden_act={config.hidden_act!r} is not supported; use gelu, gelu_new or relu.")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={config.dtype!r} is not supported; use 'float32' or 'bfloat16'.")
    if config.remat not in ("none", "full", "dots"):
        raise ValueError(f"remat={config.remat!r} is not supported; use 'none', 'full' or 'dots'.")
    if config.attention not in ("full", "longformer"):
        raise ValueError(f"attention={config.attention!r} is not supported; use 'full' or 'longformer'.")
    if config.attention == "longformer":
        if len(config.attention_window) != config.num_layers:
            raise ValueError(
                f"attention_window has {len(config.attention_window)} entries but the model has "
                f"num_layers={config.num_layers}; give one value, or one per layer."
            )
        for layer, window in enumerate(config.attention_window):
            if window <= 0 or window % 2:
                raise ValueError(
                    f"attention_window={window} (layer {layer}) must be even and positive: it is "
                    f"the full two-sided width, each token seeing window // 2 tokens per side."
                )
        if config.max_global_tokens < 1:
            raise ValueError(f"max_global_tokens={config.max_global_tokens} must be at least 1.")
