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
    for pinned in ('"vllm==${VLLM_VERSION}"', '"transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}"',
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
