#!/usr/bin/env python
"""Convert Qwen3 checkpoints between Hugging Face safetensors and Megatron-Core distributed checkpoints.

    python tools/convert_checkpoint.py hf-to-megatron --hf-dir IN --out-dir OUT --tp N --pp M [--overwrite]
    python tools/convert_checkpoint.py megatron-to-hf --megatron-dir IN --out-dir OUT [--overwrite]

Single process, no torchrun. The Megatron checkpoint loads at any TP/PP whose padded vocab matches the --tp it
was converted for (`dist_checkpointing.load(model.sharded_state_dict(), OUT)`). OUT is written to a temporary
folder beside it and renamed when complete. Exit status 2 with a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="HF folder -> Megatron distributed checkpoint")
    to_mg.add_argument("--hf-dir", required=True)
    to_mg.add_argument("--out-dir", required=True)
    to_mg.add_argument("--tp", type=int, required=True, help="tensor parallel size the checkpoint will be loaded at")
    to_mg.add_argument("--pp", type=int, required=True, help="pipeline parallel size (checked against the layers)")
    to_mg.add_argument("--overwrite", action="store_true")
    to_hf = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF folder")
    to_hf.add_argument("--megatron-dir", required=True)
    to_hf.add_argument("--out-dir", required=True)
    to_hf.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(min(8, os.cpu_count() or 1))
    from megatron_trace.checkpoint.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf

    start = time.perf_counter()
    try:
        if args.command == "hf-to-megatron":
            convert_hf_to_megatron(args.hf_dir, args.out_dir, args.tp, args.pp, overwrite=args.overwrite)
        else:
            convert_megatron_to_hf(args.megatron_dir, args.out_dir, overwrite=args.overwrite)
    except (ConversionError, FileNotFoundError, ValueError, pickle.UnpicklingError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a library's own error (truncated file, full disk): name the folders
        src = args.hf_dir if args.command == "hf-to-megatron" else args.megatron_dir
        print(f"convert_checkpoint: error: converting {src} to {args.out_dir} failed: {type(e).__name__}: {e} "
              f"(the output folder was left as it was)", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
