"""One rank of the two-node colocated check (run by tests/test_colocated.py under `torchrun --nnodes 2`, one process
per simulated node, DP=2): each node starts its own generation server; a TRACE step samples from both; the update
reaches both (their vLLM log-probs against transformers on the trained weights); node 1's server is killed and the
next step fails on every rank naming it. Writes `<output_dir>/result.<rank>.json`.

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --master-addr 127.0.0.1 --master-port P \
        tests/two_node_trace.py OUTPUT_DIR [dotted overrides]
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tiny_hf_model import hf_logprobs  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs",
                      "tiny_cpu.yaml")
PROMPTS = [[40, 107, 264, 17], [785, 26, 374, 220, 19]]  # inside the 4,000-entry tokenizer


def main() -> None:
    import torch.distributed as dist

    from megatron_trace.config import load_config
    from megatron_trace.sync.hf_export import save_hf_folder
    from megatron_trace.rollout.types import SamplingConfig
    from megatron_trace.train.trainer import Trainer

    out_dir = sys.argv[1]
    cfg = load_config(CONFIG, [
        f"logging.output_dir={out_dir}", "parallel.tp=1", "train.steps=1", "rollout.placement=colocated",
        "rollout.advertise_host=127.0.0.1", "rollout.prompts_per_step=4", "rollout.group_size=2",
        "rollout.max_response_tokens=8", "rollout.max_model_len=256", "optim.micro_batch_size=4",
        # a random model earns no reward (zero advantages): decoupled weight decay makes the step change the
        # weights all the same, so the update has something to carry
        "optim.lr=0.05", "optim.weight_decay=0.5", "logging.tensorboard=false", "rollout.server_start_timeout_s=600", *sys.argv[2:]])
    trainer = Trainer(cfg)
    rank = dist.get_rank()
    result: dict = {"rank": rank, "leaders": trainer.colocated.leaders, "urls": trainer.colocated.urls}
    try:
        sampled: dict[str, int] = {}
        if rank == 0:
            pool = trainer.engine
            for name, engine in zip(pool.names, pool.engines):
                real = engine.generate
                engine.generate = lambda prompts, sampling, name=name, real=real: (
                    sampled.__setitem__(name, sampled.get(name, 0) + len(prompts)), real(prompts, sampling))[1]
        trainer.train()  # one TRACE step: rollout on both servers, update, node-local sync, commit
        result["sampled"] = sampled
        result["version"] = trainer.colocated.version
        hf_dir = os.path.join(out_dir, "trained_hf")
        save_hf_folder(trainer.model[0], trainer.hf_config, hf_dir)  # collective; rank 0 writes
        if rank == 0:
            from transformers import Qwen3ForCausalLM

            hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            result["versions"] = trainer.engine.versions()
            initial = Qwen3ForCausalLM.from_pretrained(os.path.join(out_dir, "rollout_model"),
                                                       dtype=torch.float32).eval()
            diffs, moved = {}, {}
            for name, client in zip(trainer.engine.names, trainer.engine.clients):
                gens = client.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=6))
                diffs[name] = max(float((torch.tensor(g[0].logprobs, dtype=torch.float64)
                                         - hf_logprobs(hf, p, g[0].token_ids)).abs().max())
                                  for p, g in zip(PROMPTS, gens))
                moved[name] = max(float((torch.tensor(g[0].logprobs, dtype=torch.float64)
                                         - hf_logprobs(initial, p, g[0].token_ids)).abs().max())
                                  for p, g in zip(PROMPTS, gens))
            result["max_logprob_diff"] = diffs
            result["max_logprob_change_from_initial"] = moved
        dist.barrier()
        if trainer.colocated.local and trainer.colocated.pusher.node == 1:  # node 1 loses its server
            proc = trainer.colocated.local[0].proc
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            result["killed"] = trainer.colocated.local[0].url
        dist.barrier()
        try:
            trainer.trace_step()
            result["second_step"] = "ran"
        except RuntimeError as e:
            result["second_step_error"] = str(e)
    finally:
        with open(os.path.join(out_dir, f"result.{rank}.json"), "w") as f:
            json.dump(result, f)
        trainer.close()


if __name__ == "__main__":
    main()
