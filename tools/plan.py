#!/usr/bin/env python
"""Capacity planner: per-GPU memory and step-time split of a TRACE run (see megatron_trace/plan.py for the model).

    python tools/plan.py --from-config examples/configs/qwen3_8b.yaml --nodes 4 --response-len 4096
    python tools/plan.py --model qwen3-32b --nodes 4 --tp 8 --pp 2 --rollout separate --rollout-nodes 2
    python tools/plan.py --from-config examples/configs/qwen3_8b.yaml --set rollout.tensor_parallel_size=4 ...
    python tools/plan.py ... --json plan.json          # also write the numbers as JSON

--from-config reads the layout and batch settings of a trainer YAML (parallel.*, rollout.*, optim.micro_batch_size,
model.*, teacher.refresh_steps, annotate.spans.coverage_cap) and plans the rollout placement the trainer would
start from it (rollout.placement: colocated engines on every GPU group, asleep while training; driver: num_servers
engines beside rank 0; separate: the listed servers); the placement flags are refused then, other flags override. Exit status 1
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


def config_from_trainer_yaml(path: str, overrides: list[str] | None = None) -> dict:
    """PlanConfig fields from a trainer YAML plus the trainer's dotted overrides (the values it would run with)."""
    from megatron_trace.config import load_config

    cfg = load_config(path, overrides or [])
    hf = cfg.model.hf_config
    r = cfg.rollout
    # The placement the trainer starts from this YAML (rollout.placement), nothing else.
    if r.placement == "colocated":  # every node: one engine per tensor_parallel_size GPUs, asleep while training
        placement = dict(rollout="colocated", rollout_tp=r.tensor_parallel_size, rollout_engines=0,
                         sleep_level=r.sleep_level)
    elif r.placement == "separate" or r.external_urls:  # the listed servers (their node count is a flag)
        placement = dict(rollout="separate", rollout_engines=len(r.external_urls), sleep_level=0)
    else:  # num_servers engines beside rank 0 on the training GPUs, never asleep
        gpus = len(r.server_gpus[0].split(",")) if r.server_gpus else 1
        placement = dict(rollout="colocated", rollout_tp=gpus, rollout_engines=r.num_servers, sleep_level=0)
    return dict(model=hf, tp=cfg.parallel.tp, pp=cfg.parallel.pp, **placement,
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
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --from-config: a dotted trainer override (as given to the trainer), repeatable")
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

    if args["set"] and not args["from_config"]:
        print("plan: error: --set: only with --from-config (it overrides the trainer YAML)", file=sys.stderr)
        return 2
    values = config_from_trainer_yaml(args["from_config"], args["set"]) if args["from_config"] else {}
    fixed = [f for f in ("rollout", "rollout_engines", "sleep_level") + (("rollout_tp",) if values.get("rollout_tp")
                                                                           else ())
             if args["from_config"] and args.get(f) is not None]
    if fixed:
        print(f"plan: error: --{fixed[0].replace('_', '-')}: with --from-config the placement is the trainer's "
              "(rollout.placement, tensor_parallel_size, num_servers, sleep_level in the YAML)", file=sys.stderr)
        return 2
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
