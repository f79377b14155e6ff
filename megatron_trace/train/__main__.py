"""Launch a megatron-trace run: `torchrun --nproc-per-node N -m megatron_trace.train --config X.yaml [k=v ...]`.

Dotted overrides (`train.steps=20 parallel.tp=2 logging.output_dir=runs/x`) are applied on top of the YAML.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Warnings that say nothing to a user, one copy per rank each, drowning the per-step lines: megatron-core 0.16's own
# default cuda_graph_scope ("full") trips its own deprecation; and on a CPU-only machine (the GPU image has Apex
# and Transformer Engine, and the launchers set CUDA_DEVICE_MAX_CONNECTIONS) the fallbacks and the CUDA advice.
_NOISE = r"full scope is deprecated"
_CPU_NOISE = (r"(Apex is not installed|Transformer Engine and Apex are not installed|When using async grad allreduce "
              r"it is recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_trace.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = parser.parse_args(argv)

    import torch

    warnings.filterwarnings("ignore", message=_NOISE, category=UserWarning)
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=_CPU_NOISE, category=UserWarning)
    from megatron_trace.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from megatron_trace.train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
