"""Hardening of checkpoint reading and conversion: a crafted distributed-checkpoint `.metadata` runs nothing
(converter, megatron's loader, torch's reader), RNG files load with weights_only=True, the converter's output may
not be or contain its input, stale temp folders of killed conversions are cleaned."""

from __future__ import annotations

import os
import pickle
import random
import re
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


# ------------------------------------------------------------------------- converter errors name the exact file
# Before: each of these reached the CLI's catch-all as a library error naming only the input/output folders (or as
# a bare "Expecting value: line 1 column 1", "pickle data was truncated", a MemoryError, an AttributeError).


def _cut(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep(os.path.getsize(path)))


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("case, mutate, needle", [
    ("safetensors cut in its data", lambda d: _cut(f"{d}/model.safetensors", lambda n: n // 2),
     r"model\.safetensors: truncated \(tensor '.*' needs data bytes up to \d+, the file holds \d+"),
    ("safetensors cut in its header", lambda d: _cut(f"{d}/model.safetensors", lambda n: 100),
     r"model\.safetensors: truncated or not a safetensors file \(its header claims \d+ bytes, the file has 100\)"),
    ("not a safetensors file", lambda d: _write(f"{d}/model.safetensors", b"hello world, not tensors" * 8),
     r"model\.safetensors: truncated or not a safetensors file \(its header claims"),
    ("empty safetensors file", lambda d: _write(f"{d}/model.safetensors", b""),
     r"model\.safetensors: truncated or not a safetensors file \(0 bytes"),
    ("index without weight_map", lambda d: _write(f"{d}/model.safetensors.index.json", b"{}"),
     r"model\.safetensors\.index\.json: an empty safetensors index .*got weight_map=None"),
    ("index with an empty weight_map", lambda d: _write(f"{d}/model.safetensors.index.json", b'{"weight_map": {}}'),
     r"model\.safetensors\.index\.json: an empty safetensors index .*got weight_map=\{\}"),
    ("index that is a list", lambda d: _write(f"{d}/model.safetensors.index.json", b"[]"),
     r"model\.safetensors\.index\.json: an empty safetensors index .*got list"),
    ("index that is not JSON", lambda d: _write(f"{d}/model.safetensors.index.json", b"garbage"),
     r"model\.safetensors\.index\.json: not valid JSON"),
])
def test_a_bad_hf_weight_file_is_refused_naming_it_and_the_cause(hf_small, tmp_path, case, mutate, needle):
    mutate(hf_small)
    with pytest.raises(ValueError, match=needle) as e:
        convert_hf_to_megatron(hf_small, str(tmp_path / "out"), 1, 1)
    assert hf_small in str(e.value), case
    assert not (tmp_path / "out").exists()


def _meg_copy(megatron_dir, tmp_path):
    import shutil

    return shutil.copytree(megatron_dir, str(tmp_path / "meg"))


def _set_conversion_meta(d, **edit):
    from megatron.core.dist_checkpointing.serialization import verify_checkpoint_and_load_strategy

    common = verify_checkpoint_and_load_strategy(d)[1].load_common(d)
    common["content_metadata"].update(edit)
    torch.save(common, os.path.join(d, "common.pt"))


@pytest.mark.parametrize("case, mutate, needle", [
    ("a truncated .distcp", lambda d: [_cut(p, lambda n: n // 2) for p in sorted(
        os.path.join(d, f) for f in os.listdir(d) if f.endswith(".distcp"))],
     r"__0_\d\.distcp: truncated \(\d+ bytes, but '.*' is stored at bytes \d+\.\.\d+\)"),
    ("a missing .distcp", lambda d: os.remove(os.path.join(d, "__0_1.distcp")),
     r"__0_1\.distcp: missing \(the checkpoint's \.metadata places"),
    ("garbage common.pt", lambda d: _write(f"{d}/common.pt", b"garbage" * 20),
     r"common\.pt: truncated or not a checkpoint's common state \(a torch\.save file\): UnpicklingError"),
    ("truncated common.pt", lambda d: _cut(f"{d}/common.pt", lambda n: n // 2),
     r"common\.pt: truncated or not a checkpoint's common state"),
    ("truncated .metadata", lambda d: _cut(f"{d}/.metadata", lambda n: n // 2),
     r"\.metadata: truncated or not a distributed-checkpoint \.metadata \(UnpicklingError: pickle data was trunc"),
    ("garbage metadata.json", lambda d: _write(f"{d}/metadata.json", b"{{{"),
     r"metadata\.json: not a distributed checkpoint's metadata\.json \(JSONDecodeError"),
    ("recorded config that is a list", lambda d: _set_conversion_meta(d, hf_config=[1]),
     r"common\.pt: conversion metadata hf_config=\[1\]: expected the HF config\.json object"),
    ("recorded config with a null vocab", lambda d: _set_conversion_meta(
        d, hf_config={**_recorded_config(d), "vocab_size": None}),
     r"common\.pt: conversion metadata: HF config vocab_size=None: expected a positive integer"),
    ("recorded padded vocab missing", lambda d: _set_conversion_meta(d, padded_vocab_size=None),
     r"common\.pt: conversion metadata padded_vocab_size=None: expected a positive integer"),
])
def test_a_bad_megatron_checkpoint_file_is_refused_naming_it_and_the_cause(megatron_dir, tmp_path, case, mutate,
                                                                           needle):
    d = _meg_copy(megatron_dir, tmp_path)
    mutate(d)
    with pytest.raises(ConversionError, match=needle) as e:
        convert_megatron_to_hf(d, str(tmp_path / "out"))
    assert d in str(e.value), case
    assert not (tmp_path / "out").exists() and [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def _recorded_config(d):
    from megatron_trace.checkpoint.convert import read_conversion_metadata

    return read_conversion_metadata(d)["hf_config"]


# The exact texts torch's and safetensors' writers give on a full filesystem (recorded on a 64 KiB tmpfs).
TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
SAFETENSORS_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"


def test_a_full_disk_while_writing_a_megatron_checkpoint_names_the_file_and_leaves_nothing(hf_small, tmp_path,
                                                                                           monkeypatch):
    def full_disk(obj, f, *a, **k):  # megatron writes common.pt with torch.save(state, path)
        raise RuntimeError(TORCH_FULL_DISK)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert_hf_to_megatron(hf_small, str(out), 1, 1)
    msg = str(e.value)
    assert re.search(rf"writing {re.escape(str(tmp_path))}/\.out\.tmp-\d+-\w+/common\.pt failed: the write failed, "
                     r"most likely because the output filesystem is full \(RuntimeError: .*unexpected pos 704 vs 598",
                     msg), msg
    assert "nothing was left half-written" in msg and not out.exists()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []  # the temp folder was removed


def test_a_full_disk_while_writing_hf_safetensors_names_the_file_and_leaves_nothing(megatron_dir, tmp_path,
                                                                                    monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # a real full disk leaves a partial file
            f.write(b"partial")
        raise SafetensorError(SAFETENSORS_FULL_DISK)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        convert_megatron_to_hf(megatron_dir, str(out))
    msg = str(e.value)
    assert re.search(r"writing .*/\.out\.tmp-\d+-\w+/model\.safetensors failed: the output filesystem is full "
                     r"\(SafetensorError: .*No space left on device", msg), msg
    assert "nothing was left half-written" in msg and not out.exists()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_an_unwritable_output_file_is_named(megatron_dir, tmp_path, monkeypatch):
    from megatron_trace.checkpoint import hf_io

    real_open = open

    def refuse_config(path, *a, **k):  # e.g. a read-only or permission-less filesystem (root bypasses chmod)
        if str(path).endswith("config.json") and a and "w" in a[0]:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(hf_io, "open", refuse_config, raising=False)
    with pytest.raises(ConversionError, match=r"writing .*/\.out\.tmp-\d+-\w+/config\.json failed: the output is "
                                              r"not writable \(PermissionError"):
        convert_megatron_to_hf(megatron_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_the_cli_prints_the_named_cause_not_a_library_traceback(hf_small, tmp_path):
    _cut(os.path.join(hf_small, "model.safetensors"), lambda n: n - 10)
    r = subprocess.run([sys.executable, TOOL, "hf-to-megatron", "--hf-dir", hf_small, "--out-dir",
                        str(tmp_path / "out"), "--tp", "1", "--pp", "1"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"convert_checkpoint: error: {hf_small}/model.safetensors: truncated (tensor" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
