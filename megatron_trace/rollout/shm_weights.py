"""Node-local weight updates over shared memory: the trainer writes each bucket once into a `/dev/shm` segment,
every generation server of the node maps that segment and loads the tensors from it (one copy on each side).

This is the CPU form of the colocated refit (on GPU the same protocol carries CUDA IPC handles instead of segment
names, see `cuda_ipc.py`): no bytes go over a socket, no bucket is serialized, hashed or staged.

Protocol (JSON bodies, bearer token; routes in server.py; all four fail with the usual JSON errors):
1. `POST /weights/shm/begin {version, tensors: [[name, dtype, shape], ...]}`: the whole update announced. The
   server validates it against the model (known names, shapes, float dtypes, complete, version above the one
   serving) before any byte moves, and opens one streamed vLLM reload that the buckets feed.
2. `POST /weights/shm {version, index, segment, nbytes, tensors: [[name, dtype, shape, offset], ...]}`, once per
   bucket, index 0, 1, ... in order: the server maps `/dev/shm/<segment>` read-only, hands the tensors (views of the
   mapping) to the reload and answers once the reload has taken them, with `released`: the indices of every bucket
   whose tensors vLLM has finished with (it keeps a layer's early tensors until the layer's last one arrived, e.g. q
   until v). The trainer reuses a segment only once its bucket was released.
3. `POST /weights/shm/finish {version, count}`: ends the stream; the server completes the reload (vLLM processes the
   remaining layers) and answers `loaded`. The engine then holds the new weights but refuses to generate until:
4. `POST /weights/shm/commit {version}`: serve `version`. The driver sends it only after every server of the run
   answered `finish`, so the version flips everywhere or nowhere; `POST /weights/shm/abort` ends an update that
   will not be committed.

Atomicity differs from the HTTP path on purpose: streaming into the engine is what keeps <= 2 buckets alive on the
server (the HTTP path stages the whole model before applying). An update that fails after loading began leaves the
engine refusing to generate (never serving a mix of two versions) until a complete update is committed; in a
colocated run the driver then stops the run.

Segments are files under /dev/shm named `mtrace-w-<pid>-<random>-<k>` (the server refuses any other name), owned by
the trainer process that creates them and removed by `ShmBucketWriter.close()` (and at interpreter exit).
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import secrets
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from megatron_trace.fast_copy import copy_into

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "mtrace-w-"
_SEGMENT_RE = re.compile(r"^mtrace-w-[0-9]+-[0-9a-f]+-[0-9]+$")
_ALIGN = 64  # tensor offsets inside a segment: cache-line aligned
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Bucket = list[tuple[str, torch.Tensor]]


class ShmProtocolError(ValueError):
    """A shared-memory bucket descriptor that cannot be accepted (bad name, offsets, sizes, dtype)."""


def dtype_name(name: str, t: torch.Tensor) -> str:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ShmProtocolError(f"weight {name!r}: dtype {t.dtype} cannot be sent (expected one of {sorted(DTYPES)})")
    return dtype


def announcement(tensors: Iterable[tuple[str, str, Sequence[int]]]) -> list[list]:
    """The JSON form of `/weights/shm/begin`'s tensor list: [[name, dtype name, shape], ...]."""
    return [[str(n), str(d), [int(x) for x in s]] for n, d, s in tensors]


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def bucket_layout(bucket: Bucket) -> tuple[list[list], int]:
    """([[name, dtype, shape, offset], ...], bytes) of a bucket laid out back to back in one segment."""
    return slot_layout((name, dtype_name(name, t), t.shape) for name, t in bucket)


def slot_layout(entries: Iterable[tuple[str, str, Sequence[int]]]) -> tuple[list[list], int]:
    """bucket_layout from (name, dtype name, shape) alone: what a bucket's tensors will occupy before they exist."""
    slots, offset = [], 0
    for name, dtype, shape in entries:
        n = DTYPES[dtype].itemsize
        for d in shape:
            n *= int(d)
        slots.append([name, dtype, [int(d) for d in shape], offset])
        offset = _aligned(offset + n)
    return slots, offset


class _Segment:
    """One /dev/shm file mapped read-write in the trainer; grows (never shrinks) to the largest bucket put in it."""

    def __init__(self, name: str):
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        self.size = 0
        self.map: mmap.mmap | None = None
        self.flat: torch.Tensor | None = None  # uint8 view of the whole mapping
        self.holds: int | None = None  # index of the bucket written here and not yet released by every server
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)

    def reserve(self, nbytes: int) -> None:
        if nbytes <= self.size:
            return
        self._unmap()
        with open(self.path, "r+b") as f:
            os.ftruncate(f.fileno(), nbytes)
            self.map = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.size = nbytes
        self.flat = torch.frombuffer(self.map, dtype=torch.uint8)

    def _unmap(self) -> None:
        self.flat = None
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a tensor view still exported: the mapping goes when it does
                pass
            self.map = None

    def close(self) -> None:
        self._unmap()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class ShmBucketWriter:
    """Trainer side: writes buckets into reusable /dev/shm segments (the one copy of the hand-off).

    `write(index, bucket)` picks a segment whose previous bucket every server released (growing it if needed),
    copies the tensors in, and returns the `/weights/shm` descriptor; `release(indices)` frees the segments of
    released buckets. A new segment is created only if every existing one still holds a bucket a server keeps, so
    a streamed update normally cycles two. Segments persist across updates (their pages stay faulted in), and are
    removed by close(), at interpreter exit, or with the process's /dev/shm files by whoever cleans up after it.
    """

    def __init__(self, tag: str = ""):
        self._base = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self._segments: list[_Segment] = []
        self._lock = threading.Lock()
        self.max_segments = 0  # most segments ever alive (the benchmark reports it)
        self._finalizer = weakref.finalize(self, _close_segments, self._segments)
        atexit.register(self._finalizer)

    def acquire(self, index: int, nbytes: int) -> "_Segment":
        """A segment of at least `nbytes` for bucket `index`: one whose previous bucket was released, else a new one."""
        with self._lock:
            seg = next((s for s in self._segments if s.holds is None), None)
            if seg is None:
                seg = _Segment(f"{self._base}-{len(self._segments)}")
                self._segments.append(seg)
                self.max_segments = max(self.max_segments, len(self._segments))
            seg.holds = index
        seg.reserve(max(nbytes, _ALIGN))
        return seg

    def write(self, index: int, bucket: Bucket) -> dict[str, Any]:
        slots, nbytes = bucket_layout(bucket)
        seg = self.acquire(index, nbytes)
        for (name, t), (_, _, _, offset) in zip(bucket, slots):
            n = t.numel() * t.element_size()
            dst = seg.flat[offset:offset + n].view(t.dtype).view(t.shape)
            copy_into(dst, t.detach())
        return {"index": index, "segment": seg.name, "nbytes": nbytes, "tensors": slots}

    def release(self, indices: Iterable[int]) -> None:
        """The buckets `indices` are no longer read by any server: their segments can take new buckets."""
        done = set(int(i) for i in indices)
        with self._lock:
            for s in self._segments:
                if s.holds in done:
                    s.holds = None

    def release_all(self) -> None:
        with self._lock:
            for s in self._segments:
                s.holds = None

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self._segments]

    def close(self) -> None:
        self._finalizer()


def _close_segments(segments: list[_Segment]) -> None:
    for s in segments:
        s.close()
    segments.clear()


# ------------------------------------------------------------------------------------------- server side: mapping

def check_segment_name(name: str) -> str:
    if not isinstance(name, str) or not _SEGMENT_RE.match(name):
        raise ShmProtocolError(f"segment {name!r}: expected a /dev/shm name of the form "
                               f"{SEGMENT_PREFIX}<pid>-<hex>-<n> (written by ShmBucketWriter)")
    return name


class SegmentMaps:
    """The server's read-only mappings of the segments it was sent, kept from one update to the next: the trainer
    cycles the same two segments, and mapping one afresh (MAP_POPULATE, then unmapping it) cost 43 ms per 622 MB,
    a third of a memcpy of those bytes. Each use re-checks the file (same device and inode, at least as long as the
    bucket); at most `capacity` are kept, the least recently used dropped (its mapping closes with its last view).
    `clear()` drops them all (an aborted update: the trainer may be gone, and a mapping of its deleted file keeps
    the file's memory)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._maps: OrderedDict[str, tuple[tuple[int, int], int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()

    def map(self, name: str, fd: int, st: os.stat_result) -> mmap.mmap:
        """A read-only mapping of the whole open file `fd` (named `name`, `st` its fstat)."""
        ident = (st.st_dev, st.st_ino)
        with self._lock:
            hit = self._maps.get(name)
            if hit is not None and hit[0] == ident and hit[1] == st.st_size:
                self._maps.move_to_end(name)
                return hit[2]
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           prot=mmap.PROT_READ)
            self._maps[name] = (ident, st.st_size, mm)
            self._maps.move_to_end(name)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)
            return mm

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


class BucketMapping:
    """One bucket's segment mapped read-only; `.tensors` are views of it; `.base` (a numpy array of this bucket
    that every view keeps alive) is collected once nothing uses the tensors any more, and the mapping then closed
    unless `maps` (SegmentMaps) keeps it for the next update."""

    def __init__(self, descriptor: dict[str, Any], max_bytes: int, maps: SegmentMaps | None = None):
        import numpy as np

        try:
            name = check_segment_name(descriptor["segment"])
            nbytes = int(descriptor["nbytes"])
            slots = [(str(n), str(d), tuple(int(x) for x in s), int(o)) for n, d, s, o in descriptor["tensors"]]
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ShmProtocolError):
                raise
            raise ShmProtocolError(f"expected segment, nbytes and tensors [[name, dtype, shape, offset], ...]: "
                                   f"{type(e).__name__}: {e}") from e
        if not 0 < nbytes <= max_bytes:
            raise ShmProtocolError(f"nbytes={nbytes}: must be in (0, {max_bytes}] (the server's bucket limit)")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShmProtocolError(f"segment {name}: cannot open {path} ({e.strerror})") from e
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise ShmProtocolError(f"segment {name}: owned by uid {st.st_uid}, not this server's {os.getuid()}")
            if st.st_size < nbytes:
                raise ShmProtocolError(f"segment {name}: {st.st_size} bytes, the descriptor says {nbytes}")
            if maps is not None:
                mm = maps.map(name, fd, st)
            else:
                mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.name = name
        self.nbytes = nbytes
        # a new array for this bucket (even over a kept mapping): its collection is what says the bucket is released
        self.base = np.frombuffer(mm, dtype=np.uint8, count=nbytes)  # keeps `mm` alive; every tensor keeps `base`
        with warnings.catch_warnings():  # read-only on purpose: the server never writes the trainer's memory
            warnings.simplefilter("ignore", UserWarning)
            # one storage for the whole segment, the tensors views of it: neighbours (q, k, v) can be fused into one
            # view without a copy (rollout/cpu_refit.py)
            flat = torch.from_numpy(self.base)
        tensors = []
        end_prev = 0
        for tname, dtype, shape, offset in slots:
            if dtype not in DTYPES:
                raise ShmProtocolError(f"weight {tname!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
            n = DTYPES[dtype].itemsize
            for d in shape:
                n *= d
            if offset < end_prev or offset % _ALIGN or offset + n > nbytes:
                raise ShmProtocolError(f"weight {tname!r}: bytes [{offset}, {offset + n}) overlap the previous "
                                       f"tensor, are misaligned or pass the segment's end ({nbytes})")
            end_prev = offset + n
            tensors.append((tname, flat[offset:offset + n].view(DTYPES[dtype]).view(shape)))
        self.tensors = tensors
