"""Rollout engines: in-process vLLM, the generation server and its client, data-parallel pools of servers, and
the weight bridge. Submodules are imported on first use (vLLM and httpx stay optional for code that only reads
rollouts)."""

from __future__ import annotations

import importlib

_EXPORTS = {"EnginePool": "pool", "EnginePoolError": "pool", "RolloutClient": "client",
            "RolloutServerError": "client", "ManagedServer": "launch", "start_engine": "launch"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
