# syntax=docker/dockerfile:1
# megatron-trace for GPU clusters: NGC PyTorch base + vLLM + Transformer Engine + Apex + megatron-core + this package.
#
#   docker build -t megatron-trace:gpu .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data -v /ckpt:/ckpt \
#       megatron-trace:gpu bash examples/run_trace_qwen3_8b.sh
#   enroot import dockerd://megatron-trace:gpu   # Slurm + pyxis: srun --container-image=megatron-trace+gpu.sqsh ...
#
# Order: vLLM first, because its wheel pins the torch build it was compiled against and replaces the base image's
# torch; then Transformer Engine and Apex are compiled against that torch (the copies that come with the NGC image
# were built for its own torch and would fail to load); then megatron-core and this package. The heavy layers
# come before any COPY of the source, so editing the code rebuilds only the last layers.
# Every version is pinned; bump them together (see docs/docker.md).

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.11-py3
FROM ${BASE_IMAGE}

ARG VLLM_VERSION=0.32.0
ARG TRANSFORMER_ENGINE_VERSION=2.11.0
# Apex master of 2026-07-08: its setup.py reads the APEX_*_EXT variables (the 2021 commit pinned before ignored
# them and built no kernels) and it no longer imports torch._six (gone from torch; `import apex` failed).
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=5.19.0
ARG MATH_VERIFY_VERSION=0.9.0
# A100 (8.0), L40S (8.9), H100/H200 (9.0), B200 (10.0): the CUDA kernels Apex and TE build for.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0;10.0"
ARG MAX_JOBS=16

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    NVTE_FRAMEWORK=pytorch \
    CUDA_DEVICE_MAX_CONNECTIONS=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git ninja-build \
    && rm -rf /var/lib/apt/lists/*

# The base image's pip constraint file pins its own torch; vLLM needs its own, so lift the constraint. Emptied,
# not deleted: the image exports PIP_CONSTRAINT=/etc/pip/constraint.txt, and pip fails on a missing file.
RUN pip uninstall -y transformer-engine transformer_engine apex flash-attn || true \
    && : > /etc/pip/constraint.txt \
    && pip install "vllm==${VLLM_VERSION}"

# The extras megatron-core itself names for Transformer Engine (its `dev` extra): the CUDA 13 core and the PyTorch
# bindings.
RUN pip install --no-build-isolation "transformer-engine[core_cu13,pytorch]==${TRANSFORMER_ENGINE_VERSION}"

RUN git clone https://github.com/NVIDIA/apex.git /tmp/apex \
    && cd /tmp/apex \
    && git checkout "${APEX_COMMIT}" \
    && NVCC_APPEND_FLAGS="--threads 4" APEX_PARALLEL_BUILD=8 APEX_CPP_EXT=1 APEX_CUDA_EXT=1 \
       pip install -v --no-build-isolation . \
    && cd / && rm -rf /tmp/apex

RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
        "math-verify==${MATH_VERIFY_VERSION}" "antlr4-python3-runtime==4.13.2"

WORKDIR /opt/megatron-trace
COPY pyproject.toml README.md ./
COPY megatron_trace ./megatron_trace
RUN pip install --no-deps . \
    && pip install safetensors sentencepiece tokenizers pyyaml pyarrow httpx fastapi uvicorn psutil tensorboard matplotlib

COPY tools ./tools
COPY examples ./examples

# Fails the build if any piece cannot be imported against the installed torch.
RUN python -c "import torch, vllm, transformer_engine.pytorch, apex, amp_C, fused_layer_norm_cuda, megatron.core, \
megatron_trace, transformers; \
print('torch', torch.__version__, 'vllm', vllm.__version__, 'megatron-core', megatron.core.__version__)"

CMD ["bash"]
