"""The Megatron -> vLLM weight bridge: a model trained at TP=2, PP=2 and TP=2 x PP=2 (tied and untied embeddings),
exported through `export_hf_buckets` and pushed into a real vLLM engine, samples with exactly the log-probs the
Megatron model itself assigns (vocabulary-parallel `token_stats` on its own logits, fp32).

Everything Megatron runs in ONE 4-rank launch (the layouts one after another; TP=2 and PP=2 alone leave DP=2,
so data-parallel replicas are exercised too). vLLM cannot share a process with a multi-rank gloo world (it
takes over the default group), so rank 0 feeds the exported tensors to a vLLM engine living in a child process
of its own (one per tied/untied model) and broadcasts the sampled responses back to every rank, which then score
them with the Megatron model.

Also here: a bucket smaller than one tensor still carries every tensor, bitwise equal to a one-bucket export;
the bridge's extra memory is bounded by the bucket plus two of the largest parameter, whatever the model size
(live bytes of every torch allocation made while the generator runs, counted through a dispatch mode); and
`save_hf_folder` writes exactly the bridge's tensors as a loadable HF folder.
"""

from __future__ import annotations

import json
import os
import traceback

import numpy as np
import pytest
import torch

from dist_harness import run_distributed

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

VOCAB = 1000  # not a multiple of 128 x tp: Megatron pads it to 1024, the bridge must strip the padding rows
LAYOUTS = ((2, 1), (1, 2), (2, 2))  # (tp, pp) on 4 ranks: DP = 2, 2, 1
STEPS, SEQ, LR = 2, 24, 1e-2
PROMPTS = [[17, 4, 900, 23, 5], [311, 8, 64, 2, 999, 150, 7]]
N_SAMPLES, NEW_TOKENS = 2, 8
BUCKET_BYTES = 48 * 1024  # a few tensors per bucket in the log-prob runs
# The memory model: many layers, small vocabulary, so the whole model is far above any "bucket + a few tensors"
# bound and a bridge that materialised the model would fail the check.
MEM_LAYERS, MEM_VOCAB, MEM_BUCKET = 8, 512, 128 * 1024
BOOKKEEPING_BYTES = 4096  # small tensors beside the weights (the stage-leader table, norms' scalars)


def _hf_config(tied: bool, vocab: int = VOCAB, layers: int = 2) -> dict:
    from megatron_trace.models import load_hf_config

    return dict(load_hf_config("tiny-tied" if tied else "tiny"), vocab_size=vocab, num_hidden_layers=layers,
                max_window_layers=layers, tie_word_embeddings=tied)


def _reference_hf_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random HF weights (same on every rank). The large embedding/head spread (logits of std ~3) gives
    peaked distributions, so a wrong tensor moves the log-probs far more than the tolerance."""
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    g = torch.Generator().manual_seed(seed)

    def init(name, shape):
        if name.endswith("norm.weight"):
            return 1 + 0.1 * torch.randn(shape, generator=g)
        std = 0.3 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0.08
        return std * torch.randn(shape, generator=g)

    return {name: init(name, shape) for name, shape in hf_param_shapes(Qwen3Dims.from_hf_config(cfg)).items()}


def _write_hf_folder(path: str, cfg: dict, state: dict[str, torch.Tensor]) -> str:
    """config.json + model.safetensors + the real Qwen3 tokenizer files, written beside and renamed."""
    import shutil

    from safetensors.torch import save_file

    from megatron_trace.data.tokenizer import qwen3_tokenizer_dir

    tmp = path + ".tmp"
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({n: t.contiguous() for n, t in state.items()}, os.path.join(tmp, "model.safetensors"))
    tok = qwen3_tokenizer_dir()
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ the vLLM child
def _vllm_child(model_dir: str, conn) -> None:
    """A vLLM engine in a process with no distributed world: takes bucket lists, answers with samples.

    Each request: list of buckets of (HF name, numpy array). Reply: ("ok", version, [[(prompt, tokens, logprobs)
    per sample] per prompt]) or ("error", traceback).
    """
    # Spawned from a rank of a torchrun-like world: vLLM must not see that world's variables.
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    torch.set_num_threads(1)  # before vLLM makes set_num_threads a no-op
    try:
        from megatron_trace.rollout.engine import EngineConfig, VLLMEngine
        from megatron_trace.rollout.types import SamplingConfig

        engine = VLLMEngine(EngineConfig(model_dir, max_model_len=64, kv_cache_memory_bytes=16 << 20))
        conn.send(("ready",))
        while (request := conn.recv()) is not None:
            try:
                buckets = [[(n, torch.from_numpy(a)) for n, a in bucket] for bucket in request]
                version = engine.update_weights(buckets)
                out = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_tokens=NEW_TOKENS,
                                                              n=N_SAMPLES, seed=7, logprobs=True))
                conn.send(("ok", version, [[(p, g.token_ids, g.logprobs) for g in gens]
                                           for p, gens in zip(PROMPTS, out)]))
            except Exception:  # noqa: BLE001 - the traceback travels to rank 0
                conn.send(("error", traceback.format_exc()))
        engine.close()
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


class _VLLMChild:
    def __init__(self, model_dir: str):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_vllm_child, args=(model_dir, child_conn), daemon=True)
        self.proc.start()
        self._reply(timeout=300)

    def _reply(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"vLLM child gave no answer in {timeout} s (exit code {self.proc.exitcode})")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"vLLM child failed:\n{msg[1]}")
        return msg

    def push_and_sample(self, buckets) -> tuple[int, list]:
        self.conn.send([[(n, t.numpy()) for n, t in bucket] for bucket in buckets])
        _, version, samples = self._reply(timeout=300)
        return version, samples

    def close(self) -> None:
        try:
            self.conn.send(None)
        finally:
            self.proc.join(timeout=30)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


# ------------------------------------------------------------------------------------------ Megatron side
def _train(chunks, optimizer, layout, seed: int) -> None:
    """A few Adam steps of next-token cross-entropy on random tokens: every weight moves by ~LR."""
    from megatron.core import tensor_parallel

    from megatron_trace.train.step import forward_backward, optimizer_step, zero_grad

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2 * layout.dp, SEQ), generator=g)[layout.dp_rank * 2:(layout.dp_rank + 1) * 2]
    mbs = [dict(tokens=tokens[i:i + 1], position_ids=torch.arange(SEQ)[None], labels=tokens[i:i + 1].roll(-1, 1))
           for i in range(2)]

    def loss_fn(logits, mb):
        ce = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), mb["labels"])
        return ce[:, :-1].sum() / (2 * layout.dp * (SEQ - 1)), {}

    for _ in range(STEPS):
        zero_grad(chunks, optimizer)
        forward_backward(chunks, mbs, loss_fn, seq_length=SEQ, micro_batch_size=1)
        ok, _, _ = optimizer_step(optimizer)
        assert ok


def _megatron_logprobs(chunks, samples) -> list[list[float]] | None:
    """Log-probs the Megatron model assigns to each sampled response: token_stats on its vocab-parallel logits,
    padded vocabulary columns masked (they are no tokens). Returned on the last stage, None elsewhere."""
    from megatron.core import parallel_state as ps

    from megatron_trace.loss.vocab_parallel import token_stats
    from megatron_trace.train.step import forward_backward

    tp_rank = ps.get_tensor_model_parallel_rank()
    group = ps.get_tensor_model_parallel_group()
    mbs = []
    for prompt, response, _ in (s for per_prompt in samples for s in per_prompt):
        seq = list(prompt) + list(response)
        tokens = torch.tensor(seq + [0] * (SEQ - len(seq)))[None]
        rows = torch.arange(len(prompt) - 1, len(seq) - 1)
        mbs.append(dict(tokens=tokens, position_ids=torch.arange(SEQ)[None], rows=rows,
                        targets=torch.tensor(response)))

    def loss_fn(logits, mb):
        z = logits[0].float()
        width = z.shape[-1]
        padding = torch.arange(tp_rank * width, (tp_rank + 1) * width) >= VOCAB
        z = z.masked_fill(padding, -1e9).index_select(0, mb["rows"])
        lp = token_stats(z, mb["targets"], vocab_start=tp_rank * width, group=group).logprob
        return logits.sum() * 0, lp.tolist()

    out = forward_backward(chunks, mbs, loss_fn, seq_length=SEQ, micro_batch_size=1, forward_only=True)
    return out if ps.is_pipeline_last_stage() else None


def _export(chunks, cfg, bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    return list(export_hf_buckets(chunks[0], cfg, bucket_bytes=bucket_bytes))


def _as_numpy(buckets) -> list[list[tuple[str, np.ndarray]]]:
    return [[(n, t.numpy().copy()) for n, t in b] for b in buckets]


def _logprob_runs(rank: int, tied: bool, workdir: str) -> dict:
    """Every layout: train, export, push into vLLM (rank 0's child), score vLLM's samples with Megatron."""
    import torch.distributed as dist

    from megatron_trace.checkpoint.hf_mapping import load_hf_state_into_model
    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import qwen3_transformer_config
    from megatron_trace.train.step import build_model_and_optimizer

    cfg = _hf_config(tied)
    initial = _reference_hf_state(cfg, seed=11)
    child = None
    if rank == 0:
        child = _VLLMChild(_write_hf_folder(os.path.join(workdir, f"hf-tied{int(tied)}"), cfg, initial))
    results = {}
    try:
        for tp, pp in LAYOUTS:
            layout = initialize_distributed(tp=tp, pp=pp, seed=5)
            try:
                tcfg = qwen3_transformer_config(cfg, tp=tp, pp=pp)
                chunks, optimizer = build_model_and_optimizer(cfg, tcfg, lr=LR)
                load_hf_state_into_model(chunks[0], initial, cfg)
                _train(chunks, optimizer, layout, seed=tp * 10 + pp)
                tiny = _export(chunks, cfg, bucket_bytes=1)
                whole = _export(chunks, cfg, bucket_bytes=1 << 40)
                packed = _export(chunks, cfg, bucket_bytes=BUCKET_BYTES)
                box = [None]
                if rank == 0:
                    version, samples = child.push_and_sample(packed)
                    box = [(version, samples)]
                dist.broadcast_object_list(box, src=0)
                version, samples = box[0]
                megatron_lp = _megatron_logprobs(chunks, samples)
                out = dict(layout=layout, megatron=megatron_lp)
                if rank == 0:
                    out.update(tiny=_as_numpy(tiny), whole=_as_numpy(whole), packed=_as_numpy(packed),
                               version=version, samples=samples,
                               initial={n: t.numpy() for n, t in initial.items()})
                results[(tp, pp)] = out
                del tiny, whole, packed
            finally:
                destroy_distributed()
    finally:
        if child is not None:
            child.close()
    return results


# ------------------------------------------------------------------------------------------ memory accounting
class LiveTorchBytes:
    """Live bytes of the tensor storages allocated by torch ops while active, and their peak (a dispatch mode).

    A storage counts from the op that created it until Python frees it (weak reference); views and in-place
    results share an input's storage and do not count. Tensors that existed before entering (the parameters)
    never count.
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(args, kwargs or {}, out)
                return out

        self._mode = _Mode()
        self._live: dict[int, tuple[object, int]] = {}
        self.peak = 0

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    @staticmethod
    def _tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                yield from LiveTorchBytes._tensors(x)
        elif isinstance(obj, dict):
            for x in obj.values():
                yield from LiveTorchBytes._tensors(x)

    def _record(self, args, kwargs, out) -> None:
        import weakref

        inputs = {t.untyped_storage().data_ptr() for t in self._tensors((args, kwargs))}
        for t in self._tensors(out):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self._live or storage.nbytes() == 0:
                continue
            self._live[ptr] = (weakref.ref(storage), storage.nbytes())
        self._live = {p: (r, n) for p, (r, n) in self._live.items() if r() is not None}
        self.peak = max(self.peak, self.live)

    @property
    def live(self) -> int:
        return sum(n for r, n in self._live.values() if r() is not None)


def _memory_run(rank: int) -> dict:
    """TP=2 x PP=2, random init: the export's peak live bytes on every rank, the consumer dropping each bucket."""
    from megatron.core import parallel_state as ps

    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.sync.weight_bridge import export_hf_buckets

    cfg = _hf_config(tied=False, vocab=MEM_VOCAB, layers=MEM_LAYERS)
    initialize_distributed(tp=2, pp=2, seed=5)
    try:
        model = build_qwen3_model(cfg)
        sizes, names = [], []
        with LiveTorchBytes() as tracker:
            for bucket in export_hf_buckets(model, cfg, bucket_bytes=MEM_BUCKET):
                sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
                names += [n for n, _ in bucket]
                del bucket
        # largest full (TP-merged) Megatron parameter: a shard times tp for the split ones
        tp = ps.get_tensor_model_parallel_world_size()
        local_max = max(p.numel() * p.element_size() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                        for p in model.parameters())
        return dict(rank=rank, peak=tracker.peak, bucket_sizes=sizes, names=names, largest_param=local_max,
                    stage_bytes=sum(p.numel() * p.element_size() for p in model.parameters()) * tp)
    finally:
        destroy_distributed()


def _save_hf_run(rank: int, workdir: str) -> dict:
    """save_hf_folder at TP=2 x PP=2 (tied), and the same model's one-bucket export to compare with."""
    from megatron_trace.data.tokenizer import load_tokenizer
    from megatron_trace.distributed import destroy_distributed, initialize_distributed
    from megatron_trace.models import build_qwen3_model
    from megatron_trace.sync.hf_export import save_hf_folder

    cfg = _hf_config(tied=True)
    initialize_distributed(tp=2, pp=2, seed=5)
    try:
        model = build_qwen3_model(cfg)
        out_dir = os.path.join(workdir, "saved")
        save_hf_folder(model, cfg, out_dir, tokenizer=load_tokenizer(), bucket_bytes=BUCKET_BYTES)
        whole = _export([model], cfg, bucket_bytes=1 << 40)
        return dict(out_dir=out_dir, whole=_as_numpy(whole) if rank == 0 else None, cfg=cfg)
    finally:
        destroy_distributed()


def _all_runs(rank: int, world_size: int, workdir: str) -> dict:
    torch.set_num_threads(1)
    return dict(logprobs={tied: _logprob_runs(rank, tied, workdir) for tied in (False, True)},
                memory=_memory_run(rank), saved=_save_hf_run(rank, workdir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("weight_bridge"))
    return run_distributed(_all_runs, 4, workdir, timeout=600)


# ------------------------------------------------------------------------------------------ the claims
def _flat(buckets) -> dict[str, np.ndarray]:
    out = {}
    for bucket in buckets:
        for name, arr in bucket:
            assert name not in out, f"{name} exported twice"
            out[name] = arr
    return out


def _expected_names(tied: bool, vocab: int = VOCAB, layers: int = 2) -> set[str]:
    from megatron_trace.checkpoint.hf_mapping import Qwen3Dims, hf_param_shapes

    names = set(hf_param_shapes(Qwen3Dims.from_hf_config(_hf_config(tied, vocab, layers))))
    return names - {"lm_head.weight"} if tied else names


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_vllm_samples_with_the_trained_megatron_models_logprobs(runs, tied, tp, pp):
    by_rank = [r["logprobs"][tied][(tp, pp)] for r in runs]
    root = by_rank[0]
    assert root["version"] == 1 + LAYOUTS.index((tp, pp))  # one complete update per layout, none refused
    samples = [s for per_prompt in root["samples"] for s in per_prompt]
    vllm_lp = [lp for _, _, lp in samples]
    assert len(samples) == len(PROMPTS) * N_SAMPLES and all(len(lp) == NEW_TOKENS for lp in vllm_lp)
    scorers = [r for r in by_rank if r["layout"].is_last_stage]
    assert len(scorers) == 4 // pp
    for r in scorers:  # every TP rank and DP replica of the last stage gets the same numbers
        megatron_lp = r["megatron"]
        assert len(megatron_lp) == len(vllm_lp)
        diff = max(abs(a - b) for m, v in zip(megatron_lp, vllm_lp) for a, b in zip(m, v))
        assert diff < 1e-4, (tied, tp, pp, diff)
    # the responses are not degenerate: sampled at temperature 1 from peaked distributions, not all one token
    assert len({t for _, toks, _ in samples for t in toks}) > NEW_TOKENS


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_the_pushed_weights_are_the_trained_ones_not_the_initial_ones(runs, tied, tp, pp):
    """Non-vacuity of the log-prob test: training moved every exported tensor far beyond float noise."""
    root = runs[0]["logprobs"][tied][(tp, pp)]
    whole = _flat(root["whole"])
    assert set(whole) == _expected_names(tied)
    for name, arr in whole.items():
        moved = float(np.abs(arr - root["initial"][name]).max())
        assert moved > 1e-3, (name, moved)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_a_bucket_smaller_than_one_tensor_carries_every_tensor_bitwise(runs, tied, tp, pp):
    root = runs[0]["logprobs"][tied][(tp, pp)]
    assert all(len(bucket) == 1 for bucket in root["tiny"])  # each tensor alone in its own bucket
    tiny, whole, packed = _flat(root["tiny"]), _flat(root["whole"]), _flat(root["packed"])
    assert len(root["whole"]) == 1
    assert list(tiny) == list(whole) == list(packed)  # same tensors, same order
    for name in whole:
        assert tiny[name].dtype == whole[name].dtype == np.float32
        assert np.array_equal(tiny[name], whole[name]) and np.array_equal(packed[name], whole[name]), name
    # packed buckets respect the limit unless a single tensor is larger
    for bucket in root["packed"]:
        size = sum(a.nbytes for _, a in bucket)
        assert size <= BUCKET_BYTES or len(bucket) == 1, size


def test_only_the_destination_rank_receives_buckets(runs):
    for r in runs[1:]:
        for tied in (False, True):
            for layout in LAYOUTS:
                assert "whole" not in r["logprobs"][tied][layout]
    assert all(r["memory"]["bucket_sizes"] == [] for r in runs[1:])


def test_extra_memory_is_bounded_by_the_bucket_plus_two_largest_tensors(runs):
    mem = {r["memory"]["rank"]: r["memory"] for r in runs}
    dst = mem[0]
    assert set(dst["names"]) == _expected_names(False, MEM_VOCAB, MEM_LAYERS)
    largest = max(m["largest_param"] for m in mem.values())
    model_bytes = sum(m["stage_bytes"] for m in mem.values()) // 2  # each stage counted by its 2 TP ranks
    assert model_bytes > 5 * (max(MEM_BUCKET, largest) + 2 * largest), "the model must dwarf the bound"
    # The destination holds one bucket (or one tensor larger than a bucket) while the next parameter is gathered
    # (its TP shards) and merged (a second full copy, briefly beside the shards); a few bookkeeping tensors.
    assert 0 < dst["peak"] <= max(MEM_BUCKET, largest) + 2 * largest + BOOKKEEPING_BYTES, (dst["peak"], largest)
    # The other stage's leader and the TP peers hold one parameter in flight (shards + merged copy) at most.
    for rank, m in mem.items():
        if rank != 0:
            assert m["peak"] <= 2 * largest + BOOKKEEPING_BYTES, (rank, m["peak"], largest)


def test_save_hf_folder_writes_the_bridge_tensors_as_an_hf_folder(runs):
    from safetensors.torch import load_file

    saved = runs[0]["saved"]
    out_dir = saved["out_dir"]
    whole = _flat(saved["whole"])
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(whole) == _expected_names(True)
    files = {}
    for fname in set(index["weight_map"].values()):
        files.update(load_file(os.path.join(out_dir, fname)))
    assert set(files) == set(whole)
    for name, arr in whole.items():
        assert np.array_equal(files[name].numpy(), arr), name
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in whole.values())
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    for key, value in saved["cfg"].items():
        assert config[key] == value, key
    assert os.path.isfile(os.path.join(out_dir, "tokenizer.json"))
    # written beside and renamed: no temporary folder left
    assert [n for n in os.listdir(os.path.dirname(out_dir)) if n.startswith(".saved.tmp")] == []
