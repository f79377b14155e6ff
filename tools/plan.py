#!/usr/bin/env python
"""Capacity planner: per-GPU memory and step-time split of a TRACE run (see megatron_trace/plan.py for the model).

    python tools/plan.py --from-config examples/configs/qwen3_8b.yaml --nodes 1 --rollout-engines 1 --rollout-tp 1
    python tools/plan.py --model qwen3-32b --nodes 4 --tp 8 --pp 2 --rollout separate --rollout-nodes 2
    python tools/plan.py ... --json plan.json          # also write the numbers as JSON

--from-config reads the layout and batch settings of a trainer YAML (parallel.*, rollout.*, optim.micro_batch_size,
model.*, teacher.refresh_steps, annotate.spans.coverage_cap); flags given explicitly override it. Exit status 1
when the configuration does not fit (the warnings say why).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_trace.plan import Hardware, PlanConfig, format_plan, plan  # noqa: E402


def config_from_trainer_yaml(path: str) -> dict:
    """PlanConfig fields from a trainer YAML (the values the trainer would run with)."""
    from megatron_trace.config import load_config

    cfg = load_config(path)
    hf = cfg.model.hf_config
    return dict(model=hf, tp=cfg.parallel.tp, pp=cfg.parallel.pp,
                distributed_optimizer=cfg.parallel.use_distributed_optimizer,
                bf16=cfg.model.bf16, recompute=cfg.model.recompute, prompts_per_step=cfg.rollout.prompts_per_step,
                group_size=cfg.rollout.group_size, response_len=cfg.rollout.max_response_tokens,
                max_response_len=cfg.rollout.max_response_tokens,
                max_tokens_per_microbatch=cfg.optim.max_tokens_per_microbatch,
                prompt_len=max(1, cfg.rollout.max_model_len - cfg.rollout.max_response_tokens) // 2,
                gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                micro_batch_size=cfg.optim.micro_batch_size, teacher_refresh_steps=cfg.teacher.refresh_steps,
                teacher_microbatches_per_pass=cfg.teacher.microbatches_per_pass,
                span_fraction=cfg.annotate.spans.coverage_cap)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-config", help="trainer YAML to read the layout and batch from")
    p.add_argument("--json", help="also write the plan as JSON here")
    for f in dataclasses.fields(PlanConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool",):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=None,
                           help=f"true/false (default {f.default})")
        elif f.name == "recompute":
            p.add_argument(flag, choices=["none", "selective", "full"], default=None)
        else:
            conv = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=conv, default=None, help=f"default {f.default}")
    for f in dataclasses.fields(Hardware):
        conv = float if f.type == "float" else str
        p.add_argument("--hw-" + f.name.replace("_", "-"), type=conv, default=None, help=f"default {f.default}")
    args = vars(p.parse_args(argv))

    values = config_from_trainer_yaml(args["from_config"]) if args["from_config"] else {}
    for f in dataclasses.fields(PlanConfig):
        if args.get(f.name) is not None:
            values[f.name] = None if (f.name == "recompute" and args[f.name] == "none") else args[f.name]
    hw_values = {f.name: args["hw_" + f.name] for f in dataclasses.fields(Hardware)
                 if args.get("hw_" + f.name) is not None}
    try:
        result = plan(PlanConfig(**values), Hardware(**hw_values))
    except (ValueError, FileNotFoundError) as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    if args["json"]:
        tmp = args["json"] + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result.as_dict(), fh, indent=2)
        os.replace(tmp, args["json"])
    return 1 if any("does not fit" in w for w in result.warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
