"""Fixtures shared by the test modules.

- `tok`: the real Qwen3 tokenizer (one load per session).
- `monkeypatch_module`: a MonkeyPatch undone when the module's tests are done (for module-scoped servers).
- `hf`: transformers' Qwen3 (fp32, eval) of each folder of the requesting module's `models` fixture, the
  independent reference of the engine and server tests.

Tiny models are written by the one builder, `tiny_hf_model.make_tiny_qwen3_dir`.
"""

from __future__ import annotations

import pytest
from tiny_hf_model import load_hf_model


@pytest.fixture(scope="session")
def tok():
    from megatron_trace.data.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def hf(models):
    return {k: load_hf_model(d) for k, d in models.items()}
