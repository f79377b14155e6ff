"""Loading a Megatron checkpoint into a model whose modules may carry Transformer Engine `_extra_state` entries
the checkpoint lacks; every other absent or surplus key still fails, naming it.

Under the TE layer spec every TE module (fused norm+linear layers, the q/k RMSNorms, `TEDotProductAttention`, the
final RMSNorm) has an `_extra_state` (FP8 scaling metadata) in its state dict and a ShardedObject in its sharded
state dict. A checkpoint written under the local spec, or by an older converter, has none of them for some
modules, and a strict load would refuse it. The extra state of a freshly built module is what it would load from a
bf16 checkpoint anyway (no FP8 history), so an absent entry is safe to skip. Megatron-LM does the same with a
`strict=False` retry, which would also skip absent weights; here only `_extra_state` keys may be absent.
"""

from __future__ import annotations

import logging

__all__ = ["CheckpointMismatchError", "is_extra_state_key", "dist_load", "load_module_state"]

logger = logging.getLogger(__name__)


class CheckpointMismatchError(KeyError):
    """The checkpoint and the model disagree on keys other than TE `_extra_state`; the message names them."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def is_extra_state_key(key: str) -> bool:
    """True for a module's extra-state entry (`..._extra_state`, also TE's per-GEMM `_extra_state1`...)."""
    last = key.split("/")[0].rsplit(".", 1)[-1]
    return last.startswith("_extra_state")


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def dist_load(sharded_state_dict: dict, checkpoint_dir: str) -> dict:
    """`dist_checkpointing.load`, skipping requested `_extra_state` objects the checkpoint does not have.

    Raises CheckpointMismatchError naming every other requested key the checkpoint lacks.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    loaded, _, absent = dist_checkpointing.load(sharded_state_dict, checkpoint_dir,
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    absent = set(absent)
    bad = {k for k in absent if not is_extra_state_key(k)}
    if bad:
        raise CheckpointMismatchError(f"{checkpoint_dir}: the checkpoint lacks {len(bad)} entries the model needs: "
                                      f"{_names(bad)}")
    if absent:
        logger.info("%s: no Transformer Engine extra state for %d modules (%s); they keep their fresh state",
                    checkpoint_dir, len(absent), _names(absent, 3))
    return loaded


def load_module_state(module, state: dict, where: str) -> None:
    """`module.load_state_dict(state)`, strict except that absent `_extra_state` entries are allowed.

    Raises CheckpointMismatchError naming every other missing key and every unexpected one.
    """
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_extra_state_key(k)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_names(missing)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys: {_names(result.unexpected_keys)}")
    if problems:
        raise CheckpointMismatchError(f"{where}: the checkpoint does not fit the model; " + "; ".join(problems))
