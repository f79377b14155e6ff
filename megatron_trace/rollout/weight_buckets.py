"""Weight buckets on the wire: safetensors bytes plus a SHA-256 checksum, shared by the server and its client.

A weight update is a sequence of buckets, each a list of (HF name, full tensor). On the wire each bucket is one
safetensors blob (a JSON header of names/dtypes/shapes, then raw little-endian data: no pickle, so a server
never executes what it receives) and its hex SHA-256, sent in the `X-Bucket-Sha256` header.
"""

from __future__ import annotations

import hashlib

import torch

# HTTP headers of a weight update: POST /weights/begin carries the target version and is answered with a push
# id; each bucket upload (POST /weights) carries the push id, index and checksum; the closing POST
# /weights/commit carries the push id and the bucket count.
VERSION_HEADER = "X-Weight-Version"  # target weight version of the whole update (int, > serving version)
PUSH_HEADER = "X-Push-Id"  # the id POST /weights/begin issued
INDEX_HEADER = "X-Bucket-Index"  # 0-based index of this bucket
COUNT_HEADER = "X-Bucket-Count"  # number of buckets in the update (commit only)
CHECKSUM_HEADER = "X-Bucket-Sha256"  # hex SHA-256 of the body


class BucketError(ValueError):
    """A bucket that cannot be accepted (checksum mismatch, undecodable bytes, duplicate names)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[bytes, str]:
    """(safetensors bytes, hex SHA-256) of one bucket. Tensors are moved to CPU and made contiguous."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, t in bucket:
        if name in tensors:
            raise BucketError(f"weight {name!r} appears twice in one bucket")
        tensors[name] = t.detach().to("cpu").contiguous()
    data = save(tensors)
    return data, sha256_hex(data)


def decode_bucket(data: bytes, checksum: str) -> list[tuple[str, torch.Tensor]]:
    """The (name, tensor) list of a bucket, after checking its SHA-256; raises BucketError if it does not verify."""
    from safetensors.torch import load

    got = sha256_hex(data)
    if got != checksum.strip().lower():
        raise BucketError(f"checksum mismatch: body has sha256 {got}, header says {checksum!r}")
    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers/data
        raise BucketError(f"bucket is not valid safetensors data: {e}") from e
    return list(tensors.items())
