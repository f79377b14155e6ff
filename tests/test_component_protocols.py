"""The protocols the trainer calls through: every generation engine and every annotator implements all of it
(no hasattr in the trainer), and a loss's declared metric reductions give the step's metrics."""

from __future__ import annotations

import inspect

import pytest
import torch

from megatron_trace.annotate.client import OpenAIAnnotator
from megatron_trace.annotate.pipeline import Annotator
from megatron_trace.annotate.reference_match import ReferenceMatchAnnotator
from megatron_trace.annotate.self_annotator import SelfAnnotator
from megatron_trace.loss.reductions import MAX, SUM, MeanOf, reduce_metrics
from megatron_trace.rollout.client import RolloutClient
from megatron_trace.rollout.engine import VLLMEngine
from megatron_trace.rollout.launch import ManagedServer
from megatron_trace.rollout.pool import EnginePool
from megatron_trace.rollout.types import GenerationEngine


def _methods(protocol) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}


@pytest.mark.parametrize("protocol, classes", [
    (GenerationEngine, (VLLMEngine, RolloutClient, ManagedServer, EnginePool)),
    (Annotator, (OpenAIAnnotator, SelfAnnotator, ReferenceMatchAnnotator)),
])
def test_every_implementation_has_every_method_of_its_protocol_with_its_parameters(protocol, classes):
    wanted = _methods(protocol)
    assert {"close"} <= set(wanted) and "on_progress" in protocol.__annotations__
    for cls in classes:
        for name, sig in wanted.items():
            impl = getattr(cls, name, None)
            assert callable(impl), f"{cls.__name__} has no {name}()"
            got = inspect.signature(impl).parameters
            for param in sig.parameters:
                assert param in got, f"{cls.__name__}.{name}() takes no {param!r}"


def test_engines_without_a_server_report_progress_through_the_same_attribute():
    client = RolloutClient(base_url="http://127.0.0.1:9")  # nothing listens: only the attribute is read
    pool = EnginePool([client])
    try:
        assert client.on_progress is None and pool.on_progress is None
    finally:
        pool.close()
    assert ReferenceMatchAnnotator().on_progress is None


def test_reduce_metrics_sums_takes_the_max_and_forms_the_declared_means():
    reductions = {"tokens": SUM, "kl_sum": SUM, "w": MAX, "kl": MeanOf("kl_sum", "tokens"),
                  "none": MeanOf("kl_sum", "empty"), "empty": SUM}
    t = torch.tensor
    per_mb = [{"tokens": t(3.0), "kl_sum": t(0.6), "w": t(0.25), "empty": t(0.0)}, {},  # {}: a padding micro-batch
              {"tokens": t(1.0), "kl_sum": t(0.2), "w": t(0.5), "empty": t(0.0)}]
    out = reduce_metrics(per_mb, reductions)
    assert out == pytest.approx({"tokens": 4.0, "kl_sum": 0.8, "w": 0.5, "kl": 0.2, "none": 0.0, "empty": 0.0})
    assert all(isinstance(v, float) for v in out.values())
    # a rank that must not count (not the loss's rank) contributes nothing
    assert reduce_metrics(per_mb, reductions, contribute=False) == {k: 0.0 for k in reductions}
    with pytest.raises(ValueError, match="MeanOf\\('w', 'tokens'\\) needs two SUM metrics"):
        reduce_metrics(per_mb, {"tokens": SUM, "w": MAX, "bad": MeanOf("w", "tokens")})
