"""tools/convert_checkpoint.py: HF -> Megatron (TP=2, PP=2) -> HF is bitwise lossless, and bad input fails early
with an error that names the cause, leaving no output folder (and no temp folder) behind."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_hf_model import CHECKPOINT_MODEL, make_tiny_qwen3_dir
from megatron_trace.checkpoint.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_trace.checkpoint.hf_io import HFTensorSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, cwd=REPO)


def assert_same_tensors(a_dir, b_dir):
    a, b = HFTensorSource(a_dir), HFTensorSource(b_dir)
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # bitwise: compare the raw bytes, not values (NaN-safe, -0.0 vs 0.0 distinguished)
        assert torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y), name


def no_leftovers(parent):
    return [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        # sharded input with an index json, vocab not a multiple of 128
        "untied-sharded": make_tiny_qwen3_dir(str(root / "untied"), seed=3, tied=False, vocab_size=300,
                                              max_shard_size="150KB", **CHECKPOINT_MODEL),
        # single file, bf16, with tokenizer files that must travel through the conversion
        "tied-bf16": make_tiny_qwen3_dir(str(root / "tied"), seed=4, tied=True, vocab_size=200, dtype="bfloat16",
                                         **{**CHECKPOINT_MODEL, "tokenizer": "files"}),
    }


def test_round_trip_through_the_cli_is_bitwise_identical_for_a_sharded_untied_model(hf_dirs, tmp_path):
    src = hf_dirs["untied-sharded"]
    assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    r = run_tool("hf-to-megatron", "--hf-dir", src, "--out-dir", mg, "--tp", "2", "--pp", "2")
    assert r.returncode == 0, r.stderr
    r = run_tool("megatron-to-hf", "--megatron-dir", mg, "--out-dir", back)
    assert r.returncode == 0, r.stderr
    assert_same_tensors(src, back)
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(back, "config.json")) as g:
        assert json.load(f) == json.load(g)
    assert no_leftovers(str(tmp_path)) == []


def test_round_trip_is_bitwise_identical_for_a_tied_bf16_model_and_keeps_tokenizer_files(hf_dirs, tmp_path):
    src = hf_dirs["tied-bf16"]
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    meta = convert_hf_to_megatron(src, mg, tp=2, pp=2)
    assert (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]) == (2, 2)
    assert (meta["vocab_size"], meta["padded_vocab_size"]) == (200, 256)
    # the output is sharded when asked to be, and lm_head never appears for a tied model
    convert_megatron_to_hf(mg, back, max_shard_bytes=100_000)
    assert os.path.exists(os.path.join(back, "model.safetensors.index.json"))
    assert "lm_head.weight" not in HFTensorSource(back).names()
    assert HFTensorSource(back).info("model.embed_tokens.weight").dtype == torch.bfloat16
    assert_same_tensors(src, back)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(back, name), "rb") as g:
            assert f.read() == g.read(), name


def _copy_with(src, dst, *, drop=(), add=None, config_edit=None):
    """A copy of HF folder `src` as one safetensors file, minus `drop`, plus `add`, with config edits."""
    os.makedirs(dst)
    source = HFTensorSource(src)
    tensors = {n: source.get(n) for n in source.names() if n not in drop}
    tensors.update(add or {})
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(config_edit or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.mark.parametrize("edit,tp,pp,message", [
    (dict(config_edit={"intermediate_size": 96}), 1, 1,
     r"tensor shapes do not match config\.json: model\.layers\.0\.mlp\.gate_proj\.weight \(128, 64\) "
     r"\(config implies \(96, 64\)\)"),
    (dict(drop=["model.layers.2.self_attn.k_norm.weight"]), 1, 1,
     r"missing tensors: model\.layers\.2\.self_attn\.k_norm\.weight"),
    (dict(add={"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}), 1, 1,
     r"extra tensors not in a Qwen3 model of this config: model\.layers\.0\.mlp\.extra_proj\.weight"),
    (dict(), 4, 1, r"tensor parallel size 4 does not divide num_key_value_heads \(query groups\)=2"),
    (dict(), 3, 1, r"tensor parallel size 3 does not divide num_attention_heads=4"),
    (dict(), 1, 3, r"pipeline parallel size 3 does not divide num_hidden_layers=4"),
])
def test_bad_hf_input_is_rejected_naming_the_cause_and_leaves_no_output(hf_dirs, tmp_path, edit, tp, pp, message):
    src = _copy_with(hf_dirs["untied-sharded"], str(tmp_path / "src"), **edit)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(src, out, tp=tp, pp=pp)
    assert not os.path.exists(out)
    assert no_leftovers(str(tmp_path)) == []


def test_a_tied_model_with_a_different_lm_head_is_rejected(hf_dirs, tmp_path):
    src = _copy_with(hf_dirs["tied-bf16"], str(tmp_path / "src"),
                     add={"lm_head.weight": torch.zeros(200, 64, dtype=torch.bfloat16)})
    with pytest.raises(ConversionError, match=r"lm_head\.weight \(tie_word_embeddings=true but it differs"):
        convert_hf_to_megatron(src, str(tmp_path / "out"), tp=1, pp=1)
    assert not os.path.exists(tmp_path / "out")


def test_existing_output_needs_overwrite_and_is_replaced_whole_with_it(hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_tool("hf-to-megatron", "--hf-dir", hf_dirs["tied-bf16"], "--out-dir", str(out), "--tp", "1", "--pp", "1")
    assert r.returncode == 2
    assert "already exists (pass --overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    convert_hf_to_megatron(hf_dirs["tied-bf16"], str(out), tp=1, pp=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "metadata.json").exists()
    with pytest.raises(ConversionError, match="is the input folder .*: replacing it would delete the input"):
        convert_megatron_to_hf(str(out), str(out))  # refused before the existing-output check
    assert no_leftovers(str(tmp_path)) == []


def test_megatron_to_hf_rejects_a_folder_that_is_not_a_converted_checkpoint(hf_dirs, tmp_path):
    with pytest.raises(ConversionError, match="not a Megatron distributed checkpoint"):
        convert_megatron_to_hf(hf_dirs["tied-bf16"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_megatron_to_hf_names_a_stored_tensor_that_does_not_fit_the_recorded_config(hf_dirs, tmp_path):
    mg = str(tmp_path / "mg")
    convert_hf_to_megatron(hf_dirs["tied-bf16"], mg, tp=1, pp=1)
    # Record a config whose MLP is narrower than the stored tensors.
    from megatron.core.dist_checkpointing.serialization import verify_checkpoint_and_load_strategy

    common = verify_checkpoint_and_load_strategy(mg)[1].load_common(mg)
    common["content_metadata"]["hf_config"]["intermediate_size"] = 96
    torch.save(common, os.path.join(mg, "common.pt"))
    with pytest.raises(ConversionError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight \(4, 256, 64\) "
                                              r"\(config implies \(4, 192, 64\)\)"):
        convert_megatron_to_hf(mg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
