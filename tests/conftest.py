import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from ascend_rl.data.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def task(tmp_path_factory, tiny_model_dir):
    """The tiny model and a small arithmetic dataset."""
    from ascend_rl.data.tasks import write_arithmetic

    data = tmp_path_factory.mktemp("arith")
    write_arithmetic(data, n_train=64, n_test=8, max_operand=9, seed=0)
    return tiny_model_dir, data


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/ascend-rl from tests."""
    monkeypatch.setenv("ASCEND_RL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def megatron_attention_variables():
    """A Megatron model built in the test process sets Transformer Engine's NVTE_*_ATTN variables for its
    attention backend; later tests' worker processes would inherit them: each test's are taken back."""
    before = {k: v for k, v in os.environ.items() if k.startswith("NVTE_")}
    yield
    for name in [k for k in os.environ if k.startswith("NVTE_")]:
        del os.environ[name]
    os.environ.update(before)
