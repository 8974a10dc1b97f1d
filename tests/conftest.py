"""Test setup shared by the whole suite.

Eight fake CPU devices let sharding tests build real meshes; the Hugging Face libraries are
kept offline so that no test can reach a hub.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against PyTorch in fp32, which never uses reduced-precision matmuls.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """Return the real data folder, skipping the test when LONGFLAX_DATA_DIR is unset."""
    path = os.environ.get("LONGFLAX_DATA_DIR")
    if not path:
        pytest.skip("LONGFLAX_DATA_DIR is not set")
    return pathlib.Path(path)
