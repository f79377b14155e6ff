"""Hardening of checkpoint reading and conversion: a crafted distributed-checkpoint `.metadata` runs nothing
(converter, megatron's loader, torch's reader), RNG files load with weights_only=True, the converter's output may
not be or contain its input, stale temp folders of killed conversions are cleaned."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from tiny_hf_model import CHECKPOINT_MODEL, make_tiny_qwen3_dir
from megatron_trace.checkpoint.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_trace.checkpoint.safe_pickle import UnsafeCheckpointError, restricted_loads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    hf = make_tiny_qwen3_dir(str(root / "hf"), seed=5, tied=False, vocab_size=200, **CHECKPOINT_MODEL)
    out = str(root / "meg")
    convert_hf_to_megatron(hf, out, 1, 1)
    return out


def _crafted_copy(megatron_dir, dst, marker):
    import shutil

    shutil.copytree(megatron_dir, dst)
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        pickle.dump(_Exploit(marker), f)
    return dst


def test_the_real_metadata_reads_through_the_allowlist(megatron_dir):
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(megatron_dir).read_metadata()
    assert "embedding.word_embeddings.weight" in meta.state_dict_metadata
    with open(os.path.join(megatron_dir, ".metadata"), "rb") as f:
        assert type(restricted_loads(f.read())).__name__ == "Metadata"


def test_a_crafted_metadata_runs_nothing_in_the_converter(megatron_dir, tmp_path):
    marker = tmp_path / "pwned"
    bad = _crafted_copy(megatron_dir, str(tmp_path / "bad"), marker)
    r = subprocess.run([sys.executable, TOOL, "megatron-to-hf", "--megatron-dir", bad, "--out-dir",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert not marker.exists()  # before: the shell command ran during the conversion
    assert r.returncode == 2 and "posix.system" in r.stderr and ".metadata" in r.stderr, r.stderr[-2000:]
    assert "refusing to unpickle" in r.stderr and not (tmp_path / "out").exists()


def test_a_crafted_metadata_runs_nothing_in_megatrons_loader_used_by_model_load_and_resume(megatron_dir, tmp_path):
    from megatron.core import dist_checkpointing

    import megatron_trace.train.checkpointing  # noqa: F401 - installs the allowlist, as the trainer does

    marker = tmp_path / "pwned"
    bad = _crafted_copy(megatron_dir, str(tmp_path / "bad"), marker)
    with pytest.raises(UnsafeCheckpointError, match=r"bad/\.metadata: refers to posix\.system"):
        dist_checkpointing.load_tensors_metadata(bad)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError):
        convert_megatron_to_hf(bad, str(tmp_path / "out"))
    assert not marker.exists()


def test_rng_files_load_with_weights_only_and_restore_every_generator(tmp_path):
    from megatron_trace.train import checkpointing as ck

    path = str(tmp_path / "rng.pt")
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {k: v for k, v in ck._rng_state().items()}
    torch.save(state, path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck._set_rng_state(ck._load_rng_state(path))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    # a file of the earlier format (numpy state as an ndarray) still loads, with only numpy's classes allowed
    old = dict(state, numpy=np.random.get_state())
    torch.save(old, path)
    assert ck._load_rng_state(path)["numpy"][0] == "MT19937"
    torch.save({"x": _Exploit(tmp_path / "pwned")}, path)
    with pytest.raises(pickle.UnpicklingError):
        ck._load_rng_state(path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ converter output


@pytest.fixture
def hf_small(tmp_path):
    return make_tiny_qwen3_dir(str(tmp_path / "work" / "hf"), seed=6, tied=True, vocab_size=150, **CHECKPOINT_MODEL)


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


@pytest.mark.parametrize("which", ["same", "parent"])
def test_overwrite_with_the_output_equal_to_or_a_parent_of_the_input_is_refused(hf_small, which):
    parent = os.path.dirname(hf_small)
    beside = os.path.join(parent, "notes.txt")
    with open(beside, "w") as f:
        f.write("keep me")
    before = _listing(parent)
    out = hf_small if which == "same" else parent
    with pytest.raises(ConversionError, match="would delete the input"):
        convert_hf_to_megatron(hf_small, out, 1, 1, overwrite=True)
    r = subprocess.run([sys.executable, TOOL, "hf-to-megatron", "--hf-dir", hf_small, "--out-dir", out,
                        "--tp", "1", "--pp", "1", "--overwrite"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 2 and "would delete the input" in r.stderr
    assert _listing(parent) == before  # before: the input and notes.txt were deleted


def test_megatron_to_hf_refuses_an_output_that_contains_its_input(megatron_dir):
    with pytest.raises(ConversionError, match="contains the input folder"):
        convert_megatron_to_hf(megatron_dir, os.path.dirname(megatron_dir), overwrite=True)
    assert os.path.isfile(os.path.join(megatron_dir, ".metadata"))


def test_stale_temp_folders_of_killed_conversions_are_cleaned(hf_small, tmp_path):
    out = str(tmp_path / "work" / "meg")
    parent = os.path.dirname(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that is no longer running
    stale = [os.path.join(parent, f".meg.tmp-{dead}-abc"), os.path.join(parent, ".meg.old-xyz"),
             os.path.join(parent, ".meg.tmp-oldformat")]
    live = os.path.join(parent, f".meg.tmp-{os.getpid()}-running")  # a conversion still running: kept
    for d in stale + [live]:
        os.makedirs(d)
    convert_hf_to_megatron(hf_small, out, 1, 1)
    assert [d for d in stale if os.path.exists(d)] == [] and os.path.isdir(live)
    assert os.path.isfile(os.path.join(out, ".metadata"))


@pytest.mark.parametrize("mutate, needle", [
    (lambda cfg: [cfg], "expected a JSON object, got list"),
    (lambda cfg: {**cfg, "vocab_size": None}, "vocab_size=None: expected a positive integer"),
    (lambda cfg: {**cfg, "hidden_size": 64.7}, "hidden_size=64.7: expected a positive integer"),
    (lambda cfg: {**cfg, "num_hidden_layers": True}, "num_hidden_layers=True"),
])
def test_a_bad_config_json_is_refused_naming_the_file_and_field(hf_small, tmp_path, mutate, needle):
    import json

    path = os.path.join(hf_small, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump(mutate(cfg), f)
    with pytest.raises((ConversionError, ValueError), match="config.json") as e:
        convert_hf_to_megatron(hf_small, str(tmp_path / "out"), 1, 1)
    assert needle in str(e.value) and not (tmp_path / "out").exists()


def test_integer_tensors_and_an_unwritable_output_are_refused_by_name(hf_small, tmp_path):
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_small, "model.safetensors")
    tensors = load_file(path)
    name = "model.norm.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(ConversionError, match=rf"not floating-point: {name} \(torch.int32\)"):
        convert_hf_to_megatron(hf_small, str(tmp_path / "out"), 1, 1)
    tensors[name] = tensors[name].to(torch.float32)
    save_file(tensors, path)
    blocker = tmp_path / "a-file"  # an output whose parent is a file: unwritable even for root
    blocker.write_text("x")
    with pytest.raises(ConversionError, match="cannot write beside the output folder .*a-file/out"):
        convert_hf_to_megatron(hf_small, str(blocker / "out"), 1, 1)
