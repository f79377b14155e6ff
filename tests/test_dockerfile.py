"""The GPU Dockerfile, checked without a Docker engine: it parses into known instructions, every dependency is
pinned (base image tag, vLLM, Transformer Engine, Apex commit, megatron-core), the build order is sane (vLLM's
torch before the extensions compiled against it; heavy layers before the source COPY; the package installed only
after its files are copied), every COPY source exists, and the image ends with an import check."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYWORDS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE",
            "VOLUME", "SHELL", "HEALTHCHECK", "STOPSIGNAL", "ONBUILD"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, backslash continuations joined."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions():
    return parse_dockerfile(open(os.path.join(ROOT, "Dockerfile")).read())


def _args(instructions) -> dict[str, str]:
    out = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            out[key] = value.strip('"')
    return out


def test_parses_into_known_instructions_starting_from_the_ngc_pytorch_base(instructions):
    assert all(word in KEYWORDS for word, _ in instructions), [w for w, _ in instructions if w not in KEYWORDS]
    first_non_arg = next(i for i, (w, _) in enumerate(instructions) if w != "ARG")
    assert instructions[first_non_arg][0] == "FROM"
    base = _args(instructions)["BASE_IMAGE"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base
    assert instructions[-1][0] in ("CMD", "ENTRYPOINT")


def test_every_dependency_is_pinned(instructions):
    args = _args(instructions)
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["VLLM_VERSION"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TRANSFORMER_ENGINE_VERSION"])
    assert re.fullmatch(r"[0-9a-f]{40}", args["APEX_COMMIT"])  # a commit, not a moving branch
    assert args["MEGATRON_CORE_VERSION"] == "0.16.1"  # the version this package is developed and tested against
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    for pinned in ('"vllm==${VLLM_VERSION}"', '"transformer-engine[core_cu13,pytorch]==${TRANSFORMER_ENGINE_VERSION}"',
                   '"megatron-core==${MEGATRON_CORE_VERSION}"', 'git checkout "${APEX_COMMIT}"'):
        assert pinned in runs, pinned
    assert ":latest" not in runs and "ADD http" not in " ".join(f"{w} {r}" for w, r in instructions)


def test_build_order_is_vllm_then_extensions_then_source(instructions):
    def index(pattern: str) -> int:
        return next(i for i, (w, r) in enumerate(instructions) if re.search(pattern, f"{w} {r}"))

    vllm = index(r"RUN .*vllm==")
    te, apex = index(r"RUN pip install [^&]*\"transformer-engine"), index(r"RUN git clone \S*apex")
    mcore, first_copy = index(r"RUN .*megatron-core=="), index(r"^COPY ")
    pkg_copy, pkg_install = index(r"^COPY megatron_trace "), index(r"RUN pip install --no-deps \.")
    assert vllm < te and vllm < apex, "TE and Apex must be compiled against the torch vLLM installs"
    assert max(vllm, te, apex, mcore) < first_copy, "heavy layers belong before the source COPY (layer cache)"
    assert pkg_copy < pkg_install and index(r"^COPY pyproject.toml") < pkg_install
    assert index(r"python -c \"import torch, vllm, transformer_engine") > pkg_install


def test_copy_sources_exist_and_workdir_is_absolute(instructions):
    for word, rest in instructions:
        if word == "COPY":
            *sources, _dest = shlex.split(rest)
            for src in sources:
                assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: not in the repository"
        if word == "WORKDIR":
            assert rest.startswith("/")


def test_run_steps_are_valid_shell(instructions):
    for word, rest in instructions:
        if word == "RUN":
            assert subprocess.run(["bash", "-n", "-c", rest]).returncode == 0, rest


def _run_with(instructions, needle: str) -> str:
    runs = [rest for word, rest in instructions if word == "RUN" and needle in rest]
    assert len(runs) == 1, f"expected one RUN step with {needle!r}, found {len(runs)}"
    return runs[0]


def test_pip_constraint_file_is_emptied_not_deleted(instructions):
    """NGC images export PIP_CONSTRAINT=/etc/pip/constraint.txt: pip fails on every later install if the file
    is gone. Emptying it lifts the base's torch pin and keeps pip working; checked by running the step's own
    constraint command on a stand-in file."""
    text = " ".join(f"{w} {r}" for w, r in instructions)
    assert not re.search(r"rm\s+(-\w+\s+)*/etc/pip/constraint\.txt", text), "the constraint file must not be deleted"
    assert "unset PIP_CONSTRAINT" not in text
    run = _run_with(instructions, "vllm==${VLLM_VERSION}")
    steps = [part.strip() for part in run.split("&&")]
    empty = [p for p in steps if "/etc/pip/constraint.txt" in p]
    assert len(empty) == 1 and steps.index(empty[0]) < next(i for i, p in enumerate(steps) if "vllm==" in p)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "constraint.txt")
        with open(path, "w") as f:
            f.write("torch==2.9.0a0+nv25.11\n")
        assert subprocess.run(["bash", "-c", empty[0].replace("/etc/pip/constraint.txt", path)]).returncode == 0
        assert os.path.isfile(path) and os.path.getsize(path) == 0


# Apex commits checked to build its kernels from the APEX_*_EXT variables (setup.py maps APEX_CPP_EXT /
# APEX_CUDA_EXT to --cpp_ext / --cuda_ext) and to import on current torch (no `torch._six`). The commit pinned
# before (705cba91, 2021) has neither: no kernels were built and `import apex` failed.
APEX_COMMITS_CHECKED = {"6424da3b4faa6c8f062da4a48c424fff3f02d42d"}
APEX_COMMITS_BROKEN = {"705cba91fc26413d484f5ce2983427d840199a97"}


def test_apex_is_a_current_commit_built_with_its_extension_flags(instructions):
    commit = _args(instructions)["APEX_COMMIT"]
    assert commit not in APEX_COMMITS_BROKEN
    assert commit in APEX_COMMITS_CHECKED, f"APEX_COMMIT={commit}: check it (see APEX_COMMITS_CHECKED) and add it"
    run = _run_with(instructions, "git checkout \"${APEX_COMMIT}\"")
    install = next(p for p in run.split("&&") if "pip install" in p)
    for flag in ("APEX_CPP_EXT=1", "APEX_CUDA_EXT=1"):
        assert flag in install, f"{flag} must be in the environment of Apex's pip install"
    assert "--no-build-isolation" in install  # the extensions build against the installed torch
    final = [r for w, r in instructions if w == "RUN" and r.startswith("python -c")][-1]
    for module in ("apex", "amp_C", "fused_layer_norm_cuda"):  # the kernels were built, not only the Python
        assert re.search(rf"\b{module}\b", final), module


def test_transformer_engine_extras_are_the_ones_megatron_core_names(instructions):
    from importlib.metadata import requires

    wanted = None
    for req in requires("megatron-core") or []:
        m = re.match(r"transformer[-_]engine\[([^\]]+)\]", req)
        if m:
            wanted = sorted(x.strip() for x in m.group(1).split(","))
    assert wanted, "megatron-core's metadata names no transformer-engine extras"
    run = _run_with(instructions, "transformer-engine[")
    got = sorted(re.search(r"transformer-engine\[([^\]]+)\]", run).group(1).split(","))
    assert got == wanted, (got, wanted)
