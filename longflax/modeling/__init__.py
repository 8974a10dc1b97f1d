"""Encoder modules, attention kernels and model settings."""

from longflax.modeling.config import ModelConfig, validate_model_config
from longflax.modeling.encoder import (
    Encoder,
    EncoderForMaskedLM,
    EncoderForQuestionAnswering,
    EncoderOutput,
    MaskedLMOutput,
    QuestionAnsweringOutput,
    build_model,
    default_qa_global_mask,
    position_ids_from_input_ids,
    validate_inputs,
)

__all__ = [
    "Encoder",
    "EncoderForMaskedLM",
    "EncoderForQuestionAnswering",
    "EncoderOutput",
    "MaskedLMOutput",
    "ModelConfig",
    "QuestionAnsweringOutput",
    "build_model",
    "default_qa_global_mask",
    "position_ids_from_input_ids",
    "validate_inputs",
    "validate_model_config",
]
