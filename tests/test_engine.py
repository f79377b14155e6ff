"""The in-process vLLM engine against transformers' Qwen3 (the independent reference), on CPU in fp32.

One engine serves the whole module (vLLM start-up costs ~8 s); each test first pushes the weights it needs,
so tests do not depend on their order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from safetensors.torch import load_file  # noqa: E402
from tiny_hf_model import hf_greedy, hf_logprobs, make_tiny_qwen3_dir  # noqa: E402

from megatron_trace.rollout.engine import EngineConfig, VLLMEngine, WeightUpdateError  # noqa: E402
from megatron_trace.rollout.types import SamplingConfig  # noqa: E402

PROMPTS = [[9707, 11, 1879, 0, 3555], [151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30], [785]]
# Longer than a KV block (vLLM caches whole blocks only), so its prefix is cached and reused across calls.
LONG_PROMPT = [(7919 * i) % 150000 + 100 for i in range(200)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "a": make_tiny_qwen3_dir(str(root / "a"), seed=1, tied=True),
        "b": make_tiny_qwen3_dir(str(root / "b"), seed=2, tied=True),
    }


@pytest.fixture(scope="module")
def engine(models):
    eng = VLLMEngine(EngineConfig(models["a"], max_model_len=256))
    yield eng
    eng.close()


def weights(model_dir, bucket_size=5):
    items = sorted(load_file(f"{model_dir}/model.safetensors").items())
    return [items[i : i + bucket_size] for i in range(0, len(items), bucket_size)]


def use(engine, models, key):
    engine.update_weights(weights(models[key]))


def test_greedy_output_equals_transformers_greedy(engine, models, hf):
    use(engine, models, "a")
    out = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=12, stop_token_ids=[]))
    for prompt, gens in zip(PROMPTS, out):
        assert len(gens) == 1
        assert gens[0].token_ids == hf_greedy(hf["a"], prompt, len(gens[0].token_ids))
        assert len(gens[0].token_ids) == 12 and gens[0].finish_reason == "length"


def test_logprobs_are_the_raw_model_logprobs_of_sampled_tokens(engine, models, hf):
    # Sampling at temperature 0.7 with top-p/top-k must still report the temperature-1 full-vocab log-probs.
    use(engine, models, "a")
    out = engine.generate(PROMPTS, SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, max_tokens=16, n=2, seed=3))
    for prompt, gens in zip(PROMPTS, out):
        assert len(gens) == 2
        for g in gens:
            assert len(g.logprobs) == len(g.token_ids) > 0
            ref = hf_logprobs(hf["a"], prompt, g.token_ids)
            torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_seeded_sample_is_reproducible_and_seed_matters(engine, models):
    use(engine, models, "a")
    s = SamplingConfig(temperature=1.0, max_tokens=16, n=2, seed=1234)
    first = engine.generate(PROMPTS, s)
    again = engine.generate(PROMPTS, s)
    other = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_tokens=16, n=2, seed=99))
    ids = lambda out: [[g.token_ids for g in gens] for gens in out]  # noqa: E731
    assert ids(first) == ids(again)
    assert [[g.logprobs for g in gens] for gens in first] == [[g.logprobs for g in gens] for gens in again]
    assert ids(first) != ids(other)


def test_stop_token_ends_the_response_with_reason_stop(engine, models):
    use(engine, models, "a")
    outs = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=12))
    # a (prompt, step) whose greedy token first appears at that step, after at least one other token
    ids = [o[0].token_ids for o in outs]
    i, cut = next((i, t) for i in range(len(ids)) for t in range(1, 12) if ids[i][t] not in ids[i][:t])
    greedy, stop = outs[i][0].token_ids, outs[i][0].token_ids[cut]
    g = engine.generate([PROMPTS[i]], SamplingConfig(temperature=0.0, max_tokens=12, stop_token_ids=[stop]))[0][0]
    assert g.finish_reason == "stop"
    assert g.token_ids[:cut] == greedy[:cut] and len(g.token_ids) <= cut + 1
    assert len(g.logprobs) == len(g.token_ids)


def test_update_weights_serves_the_new_model_not_stale_prefix_cache(engine, models, hf):
    use(engine, models, "a")
    greedy = SamplingConfig(temperature=0.0, max_tokens=10)
    prompts = PROMPTS + [LONG_PROMPT]
    before = engine.generate(prompts, greedy)  # fills the prefix cache with model a's KV of the long prompt
    version = engine.weight_version
    assert engine.update_weights(weights(models["b"], bucket_size=3)) == version + 1 == engine.weight_version
    after = engine.generate(prompts, greedy)
    for prompt, g_a, g_b in zip(prompts, before, after):
        assert g_b[0].weight_version == version + 1
        assert g_b[0].token_ids == hf_greedy(hf["b"], prompt, 10)
        assert g_b[0].token_ids != g_a[0].token_ids
        ref = hf_logprobs(hf["b"], prompt, g_b[0].token_ids)
        torch.testing.assert_close(torch.tensor(g_b[0].logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
    # and back again: the tied output head follows the embedding both ways
    use(engine, models, "a")
    back = engine.generate(prompts, greedy)
    assert [g[0].token_ids for g in back] == [g[0].token_ids for g in before]


def test_a_refused_update_keeps_the_old_weights_and_version(engine, models):
    use(engine, models, "a")
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)
    ref = engine.generate(PROMPTS, greedy)
    version = engine.weight_version
    good = weights(models["b"])
    flat = [t for b in good for t in b]
    bad_updates = {
        "unknown weight": good + [[("model.layers.9.mlp.up_proj.weight", torch.zeros(256, 128))]],
        "has shape": [[(n, t[:-1] if n.endswith("embed_tokens.weight") else t) for n, t in b] for b in good],
        "missing": [flat[:-1]],
        "appears twice": good + [flat[:1]],
        "dtype": [[(n, t.to(torch.int32) if i == 0 else t) for i, (n, t) in enumerate(flat)]],
    }
    for needle, update in bad_updates.items():
        with pytest.raises(WeightUpdateError, match=needle):
            engine.update_weights(update)
    with pytest.raises(WeightUpdateError, match="must exceed"):
        engine.update_weights(good, version=version)
    assert engine.weight_version == version
    assert [g[0].token_ids for g in engine.generate(PROMPTS, greedy)] == [g[0].token_ids for g in ref]


def test_a_stream_failing_midway_blocks_generation_until_a_complete_update(engine, models):
    use(engine, models, "a")
    version = engine.weight_version

    def stream():
        yield from weights(models["b"])[:2]
        raise OSError("trainer died mid-transfer")

    with pytest.raises(OSError, match="trainer died"):
        engine.update_weights(stream())
    assert engine.weight_version == version
    with pytest.raises(RuntimeError, match="failed part-way"):
        engine.generate(PROMPTS, SamplingConfig(max_tokens=4))
    use(engine, models, "a")
    assert len(engine.generate(PROMPTS, SamplingConfig(max_tokens=4))) == len(PROMPTS)


def test_workers_carry_the_nccl_weight_receiver_extension(engine):
    assert engine._llm.collective_rpc("weight_receiver_ready") == [True]
    with pytest.raises(Exception, match="CUDA"):
        engine.init_weight_group("127.0.0.1", 29998, 1, 2)


def test_bad_requests_name_their_cause(engine, models):
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        engine.generate([[1] * 250], SamplingConfig(max_tokens=16))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingConfig())
    with pytest.raises(ValueError, match="top_k"):
        engine.generate(PROMPTS, SamplingConfig(top_k=0, max_tokens=8))
    with pytest.raises(RuntimeError, match="enable_sleep_mode"):
        engine.sleep()
    with pytest.raises(ValueError, match="config.json"):
        EngineConfig("/nonexistent/model")
