import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodels import make_model_dir, synthetic_text  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Token caches of tests go to a per-session folder, never the user's ~/.cache/winq (the default model may
    still be read from it)."""
    if "WINQ_TEST_KEEP_CACHE" not in os.environ:
        monkeypatch.setenv("WINQ_CACHE", str(tmp_path_factory.getbasetemp() / "winq-cache"))


@pytest.fixture
def user_cache(monkeypatch):
    """Slow tests read the built-in default model from the user's cache (converted once), not a per-test one."""
    monkeypatch.setenv("WINQ_CACHE", os.environ.get("WINQ_REAL_CACHE") or str(Path.home() / ".cache" / "winq"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.txt"
    p.write_text(synthetic_text(600, seed=1))
    return p


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama prepare()d for 4-bit lsq with per-row scales and saved, untrained, as a winq checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import winq
    from winq.checkpoint import save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    cfg = winq.QuantConfig(bits=4, group_size=-1, embed="float")
    winq.prepare(model, cfg)
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    return save_checkpoint(tmp_path_factory.mktemp("tiny-ckpt") / "ck", model, tok, cfg, None)
