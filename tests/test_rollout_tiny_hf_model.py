"""The shared tiny-Qwen3 fixture writes what transformers loads back: same seed, same weights; tied means tied."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf_model import make_tiny_qwen3_dir


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    def weights(name, seed):
        d = make_tiny_qwen3_dir(str(tmp_path / name), seed=seed, tied=True, vocab_size=151680)
        return load_file(os.path.join(d, "model.safetensors"))

    a, a2, b = weights("a", 3), weights("a2", 3), weights("b", 4)
    assert a.keys() == a2.keys() == b.keys()
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert all(t.dtype == torch.float32 for t in a.values())


def test_folder_loads_in_transformers_with_the_requested_shape_and_tying(tmp_path):
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    d = make_tiny_qwen3_dir(str(tmp_path / "m"), seed=0, tied=False, layers=1, hidden=64, heads=2, kv_heads=1,
                            head_dim=32, intermediate=96)
    cfg = json.load(open(os.path.join(d, "config.json")))
    shape = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["tie_word_embeddings"])
    assert shape == (64, 1, 32, False)
    m = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" in load_file(os.path.join(d, "model.safetensors"))
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.decode(tok("Hello, world!")["input_ids"]) == "Hello, world!"
    assert not os.path.exists(d + ".tmp-writing")


def test_shapes_vllm_cannot_serve_are_refused(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_qwen3_dir(str(tmp_path / "x"), seed=0, tied=True, head_dim=16)
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_qwen3_dir(str(tmp_path / "y"), seed=0, tied=True, vocab_size=1000)
