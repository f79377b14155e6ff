#!/usr/bin/env python
"""Serve a vLLM generation engine over HTTP for disaggregated rollouts.

    MEGATRON_TRACE_ROLLOUT_TOKEN=$(openssl rand -hex 16) python tools/serve_rollout.py --model /path/to/hf --port 8100

See `megatron_trace/rollout/server.py` for the routes; `RolloutClient` is the matching client.
"""

import logging

from megatron_trace.rollout.server import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
