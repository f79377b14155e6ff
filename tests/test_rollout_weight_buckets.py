"""Weight buckets on the wire: safetensors bytes with a SHA-256 that any corruption breaks."""

import pytest
import torch

from megatron_trace.rollout.weight_buckets import BucketError, decode_bucket, encode_bucket, sha256_hex


def test_a_bucket_round_trips_bit_exactly_in_every_float_dtype():
    g = torch.Generator().manual_seed(0)
    bucket = [(f"model.layers.0.w_{dt}".replace("torch.", ""), torch.randn(3, 5, generator=g).to(dt))
              for dt in (torch.float32, torch.bfloat16, torch.float16)]
    bucket.append(("model.norm.weight", torch.randn(8, 2, generator=g).t()))  # non-contiguous input
    data, digest = encode_bucket(bucket)
    assert digest == sha256_hex(data) and len(digest) == 64
    out = dict(decode_bucket(data, digest))
    assert sorted(out) == sorted(n for n, _ in bucket)
    for name, t in bucket:
        assert out[name].dtype == t.dtype and torch.equal(out[name], t)


def test_any_flipped_byte_fails_the_checksum():
    data, digest = encode_bucket([("w", torch.arange(64, dtype=torch.float32))])
    for pos in (0, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(BucketError, match="checksum mismatch"):
            decode_bucket(bytes(bad), digest)


def test_garbage_with_a_matching_checksum_is_rejected_as_not_safetensors():
    junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    with pytest.raises(BucketError, match="not valid safetensors"):
        decode_bucket(junk, sha256_hex(junk))


def test_a_name_twice_in_one_bucket_is_refused():
    with pytest.raises(BucketError, match="twice"):
        encode_bucket([("w", torch.zeros(1)), ("w", torch.ones(1))])
