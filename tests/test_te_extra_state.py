"""Converted checkpoints and trainer checkpoints load under the Transformer Engine layer spec.

Transformer Engine cannot be imported here, so the TE spec's module tree comes from megatron-core's own
`get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)` (what `models.qwen3._layer_spec` returns on
GPU), with its `TESpecProvider` replaced by stand-ins that behave like the TE classes where checkpoints are
concerned: fused norm+linear layers (`layer_norm_weight`), norms with an `_extra_state` (TENorm: the q/k norms,
and the final norm that `TransformerBlock` builds from `TENorm` when TE is present), and a core attention whose
plain state dict has an `_extra_state` its sharded state dict leaves out (TEDotProductAttention). The expected
key set is that model's sharded state dict.

Checked: the converter writes every key that set requests; a converted checkpoint loads into it with the
values of the local spec; a checkpoint without any TE extra state (an older conversion, a local-spec trainer
checkpoint) loads too; a checkpoint lacking a real tensor, or a state dict lacking a weight, still fails, naming it.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from dist_harness import run_distributed
from tiny_hf_model import CHECKPOINT_MODEL, make_tiny_qwen3_dir


def te_standin_spec():
    """megatron-core's TE layer spec built around stand-in TE modules; also patches TransformerBlock's final
    norm class (TENorm under TE). Returns (spec, patches to keep active while building)."""
    from megatron.core.models import backends
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import transformer_block
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class ExtraState:
        """TE modules keep FP8 metadata as extra state (None here: bf16, no FP8 history)."""

        def get_extra_state(self):
            return None

        def set_extra_state(self, state):
            self.loaded_extra_state = True

    class TENormStandIn(ExtraState, torch.nn.Module):
        def __init__(self, config, hidden_size, eps=1e-5, **_):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class TELayerNormColumnParallelLinearStandIn(ColumnParallelLinear):
        def __init__(self, input_size, output_size, **kw):
            super().__init__(input_size, output_size, **kw)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

    class TEDotProductAttentionStandIn(ExtraState, DotProductAttention):
        pass  # megatron's local sharded_state_dict, like TE's, leaves the extra state out

    class TESpecProviderStandIn(backends.LocalSpecProvider):
        def fuse_layernorm_and_linear(self):
            return True

        def column_parallel_layer_norm_linear(self):
            return TELayerNormColumnParallelLinearStandIn

        def row_parallel_linear(self):
            return RowParallelLinear

        def layer_norm(self, rms_norm=False, for_qk=False):
            return TENormStandIn

        def core_attention(self):
            return TEDotProductAttentionStandIn

    with mock.patch.object(gpt_layer_specs, "TESpecProvider", TESpecProviderStandIn, create=True):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
    return spec, [mock.patch.object(transformer_block, "LayerNormImpl", TENormStandIn)]


def build(hf_config, te: bool):
    from megatron_trace.models import qwen3

    if not te:
        return qwen3.build_qwen3_model(hf_config)
    spec, patches = te_standin_spec()
    with mock.patch.object(qwen3, "_layer_spec", lambda: spec):
        for p in patches:
            p.start()
        try:
            return qwen3.build_qwen3_model(hf_config)
        finally:
            for p in patches:
                p.stop()


def sharded_keys(model) -> set[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    out = set()

    def walk(x):
        if isinstance(x, ShardedBase):
            out.add(x.key)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(model.sharded_state_dict())
    return out


def _checks(rank, world_size, hf_dir, workdir):
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_trace.checkpoint import convert
    from megatron_trace.checkpoint.hf_io import read_hf_config
    from megatron_trace.checkpoint.tolerant_load import CheckpointMismatchError, dist_load, load_module_state
    from megatron_trace.distributed import destroy_distributed, initialize_distributed

    out = {}

    def attempt(fn):  # each check's outcome is recorded, so one failing load does not hide the others
        try:
            fn()
            return "ok"
        except BaseException as e:  # noqa: BLE001 - torch.distributed.checkpoint's errors are BaseExceptions
            return f"FAILED: {type(e).__name__}: {e}"

    hf_config = read_hf_config(hf_dir)
    convert.convert_hf_to_megatron(hf_dir, f"{workdir}/mg", tp=1, pp=1)
    # What an older conversion wrote: no TE extra state at all.
    with mock.patch.object(convert, "_EXTRA_STATE_MODULES", ()), \
            mock.patch.object(convert, "_GLOBAL_EXTRA_STATE", (), create=True):
        convert.convert_hf_to_megatron(hf_dir, f"{workdir}/mg_old", tp=1, pp=1)

    initialize_distributed(tp=1, pp=1)
    try:
        te_model, local_model = build(hf_config, te=True), build(hf_config, te=False)
        expected = sharded_keys(te_model)
        stored = {v.key for v in load_sharded_metadata(f"{workdir}/mg").values()}
        out["expected_extra"] = sorted(k for k in expected if "_extra_state" in k)
        out["plain_extra"] = sorted(k for k in te_model.state_dict() if "_extra_state" in k)
        out["not_written"] = sorted(expected - stored)

        out["te_load"] = attempt(lambda: convert.load_converted_checkpoint(te_model, f"{workdir}/mg"))
        convert.load_converted_checkpoint(local_model, f"{workdir}/mg")
        te_sd, local_sd = te_model.state_dict(), local_model.state_dict()
        l0 = "decoder.layers.0."
        out["same_values"] = all(torch.equal(te_sd[k], local_sd[k]) for k in (
            f"{l0}self_attention.linear_qkv.weight", f"{l0}self_attention.q_layernorm.weight",
            f"{l0}mlp.linear_fc2.weight", "decoder.final_layernorm.weight", "embedding.word_embeddings.weight"))
        out["fused_norm_loaded"] = torch.equal(te_sd[f"{l0}self_attention.linear_qkv.layer_norm_weight"],
                                               local_sd[f"{l0}input_layernorm.weight"])
        out["q_norm_extra_state_loaded"] = getattr(
            te_model.decoder.layers[0].self_attention.q_layernorm, "loaded_extra_state", False)

        old_te = build(hf_config, te=True)
        # Tolerated: only extra state is absent.
        out["old_load"] = attempt(lambda: convert.load_converted_checkpoint(old_te, f"{workdir}/mg_old"))
        out["old_loaded"] = torch.equal(old_te.state_dict()[f"{l0}mlp.linear_fc1.weight"],
                                        local_sd[f"{l0}mlp.linear_fc1.weight"])

        # A real tensor the checkpoint lacks still fails, naming it.
        sd = build(hf_config, te=True).sharded_state_dict()
        sd["phantom"] = ShardedTensor.from_rank_offsets("decoder.phantom.weight", torch.zeros(3), replica_id=0)
        try:
            dist_load(sd, f"{workdir}/mg")
            out["phantom"] = "loaded"
        except CheckpointMismatchError as e:
            out["phantom"] = str(e)
        # A state dict lacking a weight (not extra state) fails too, naming it.
        partial = {k: v for k, v in te_sd.items() if k != f"{l0}mlp.linear_fc2.weight"}
        try:
            load_module_state(build(hf_config, te=True), partial, "here")
            out["partial"] = "loaded"
        except CheckpointMismatchError as e:
            out["partial"] = str(e)

        # A trainer checkpoint saved under the local spec resumes into the TE spec (and vice versa).
        from megatron_trace.train.checkpointing import load_checkpoint, save_checkpoint

        path = save_checkpoint(f"{workdir}/ckpt", 1, [local_model], None, {"step": 1}, save_optimizer=False)
        resumed = build(hf_config, te=True)
        out["resume"] = attempt(lambda: load_checkpoint(path, [resumed], None))
        out["resumed"] = torch.equal(resumed.state_dict()[f"{l0}mlp.linear_fc2.weight"],
                                     local_sd[f"{l0}mlp.linear_fc2.weight"])
        path = save_checkpoint(f"{workdir}/ckpt_te", 1, [te_model], None, {"step": 1}, save_optimizer=False)
        back = build(hf_config, te=True)
        out["te_resume"] = attempt(lambda: load_checkpoint(path, [back], None))
        out["te_resumed"] = torch.equal(back.state_dict()[f"{l0}mlp.linear_fc2.weight"],
                                        local_sd[f"{l0}mlp.linear_fc2.weight"])
    finally:
        destroy_distributed()
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("te_extra_state")
    hf_dir = make_tiny_qwen3_dir(str(root / "hf"), seed=5, tied=False, vocab_size=256,
                                 **{**CHECKPOINT_MODEL, "layers": 2})
    return run_distributed(_checks, 1, hf_dir, str(root), init_gloo=False, timeout=300)[0]


def test_the_standin_te_spec_has_the_extra_state_te_modules_declare(results):
    """The derivation is not vacuous: the TE spec asks for the q/k norms' and the final norm's extra state,
    and the attention's exists only in the plain state dict (the one a strict load_state_dict checks)."""
    extra = results["expected_extra"]
    for key in ("decoder.layers.self_attention.q_layernorm._extra_state",
                "decoder.layers.self_attention.k_layernorm._extra_state",
                "decoder.layers.self_attention.linear_qkv._extra_state", "decoder.final_layernorm._extra_state"):
        assert key in extra, (key, extra)
    assert not any("core_attention" in k for k in extra)
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in results["plain_extra"]


def test_the_converter_writes_every_key_the_te_spec_expects(results):
    assert results["not_written"] == []


def test_a_converted_checkpoint_loads_under_the_te_spec_with_the_local_specs_values(results):
    assert results["te_load"] == "ok"
    assert results["same_values"] and results["fused_norm_loaded"]
    assert results["q_norm_extra_state_loaded"]  # the written object reached the module


def test_a_checkpoint_without_te_extra_state_loads(results):
    assert results["old_load"] == "ok" and results["old_loaded"]


def test_trainer_checkpoints_resume_under_the_te_spec(results):
    """From a local-spec checkpoint (no TE extra state) and from a TE-spec one (no attention extra state: its
    sharded state dict leaves it out, its plain state dict has it)."""
    assert results["resume"] == "ok" and results["resumed"]
    assert results["te_resume"] == "ok" and results["te_resumed"]


def test_any_other_absent_key_still_fails_naming_it(results):
    assert "decoder.phantom.weight" in results["phantom"] and "lacks 1 entries" in results["phantom"]
    assert "decoder.layers.0.mlp.linear_fc2.weight" in results["partial"] and "missing 1 keys" in results["partial"]
