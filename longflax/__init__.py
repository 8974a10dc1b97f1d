"""longflax: long-context (Longformer-style) multilingual encoders in JAX/Flax NNX."""

from longflax.model_io import load, save_model
from longflax.modeling import ModelConfig, build_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "build_model", "load", "save_model"]
