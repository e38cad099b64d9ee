"""One fixed set of logged keys per update, whatever modalities a rank's step held.

fairseq sums the logging outputs of data-parallel ranks with one all-reduce of a flat buffer
(``Trainer._fast_stat_sync_sum`` -> ``distributed_utils.all_reduce_dict``) when the criterion's
``logging_outputs_can_be_summed()`` is True. That buffer is built from the local dict's keys, in
their order, split into "already on the device" and "everything else". Two ranks whose steps held
different modalities (validation: one modality has fewer batches; training: a dummy batch) would
log different keys and reduce buffers of different sizes: gloo fails with "op.preamble.length <=
op.nbytes", NCCL hangs or mixes up values.

So the task completes every logging output to the criterion's full key schema, in the schema's
order, absent keys as zeros, and turns every value into a float64 0-dim tensor on the model's
device. The value kinds are then the same on every rank too (a criterion may log Python numbers
or tensors, on the CPU or the GPU), and no value needs a device-to-host copy here.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["multitask_logging_keys", "logging_keys_of", "complete_logging_output"]

# what every criterion logs for fairseq itself
_FAIRSEQ_KEYS = ("loss", "sample_size", "ntokens", "nsentences")
# the quantizer's statistics, logged once per speech batch
_QUANTIZER_KEYS = ("_quantizer_batches", "_code_perplexity_sum", "_prob_perplexity_sum",
                   "_gumbel_temperature_sum")


@functools.lru_cache(maxsize=None)  # built from constants; asked for at every step
def multitask_logging_keys() -> Tuple[str, ...]:
    """Every key ``slam_multitask`` may log, from its objective list, in a fixed order.

    Per objective ``_<name>_loss_sum`` and ``_<name>_count`` (and ``_<name>_correct`` for the
    objectives with an accuracy), the quantizer's sums, and the per-modality counts.
    """
    from slam_fairseq.criterions import slam_multitask

    keys = list(_FAIRSEQ_KEYS)
    for name in slam_multitask.OBJECTIVE_WEIGHTS:
        keys += [f"_{name}_loss_sum", f"_{name}_count"]
        if name in slam_multitask._WITH_ACCURACY:
            keys.append(f"_{name}_correct")
    keys += _QUANTIZER_KEYS
    keys += slam_multitask._COUNTS
    return tuple(keys)


def logging_keys_of(criterion) -> Optional[Tuple[str, ...]]:
    """The key schema of ``criterion``: its own ``logging_keys()`` when it has one, the
    ``slam_multitask`` schema for that criterion, else None (its outputs are left as they are)."""
    own = getattr(criterion, "logging_keys", None)
    if callable(own):
        return tuple(own())
    from slam_fairseq.criterions.slam_multitask import SlamMultitaskCriterion

    if isinstance(criterion, SlamMultitaskCriterion):
        return multitask_logging_keys()
    return None


def _as_double(value: Any) -> torch.Tensor:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"a logged value must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().reshape(()).to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def complete_logging_output(output: Dict[str, Any], keys: Sequence[str], device: torch.device,
                            criterion_name: str = "the criterion") -> Dict[str, torch.Tensor]:
    """``output`` with exactly ``keys``, in that order: absent ones 0, every value a float64
    0-dim tensor on ``device``.

    Args:
        output: one step's merged logging output (Python numbers and/or scalar tensors).
        keys: the criterion's complete schema (:func:`logging_keys_of`).
        device: where every value goes (the model's device: the same on every rank).
        criterion_name: named in the error about a key outside the schema.
    Raises:
        ValueError: ``output`` holds a key the schema lacks: ranks could then disagree again.
    """
    unknown = [key for key in output if key not in keys]
    if unknown:
        raise ValueError(
            f"{criterion_name} logged {unknown}, which are not in its logging key schema "
            f"(slam_fairseq/tasks/logging_schema.py): every data-parallel rank must log the same keys, so "
            "add them to the schema")
    host = [key for key in keys if key not in output or not torch.is_tensor(output[key])]
    # the Python numbers (and zeros) travel to the device in one copy
    host_values = torch.tensor([float(output.get(key, 0.0)) for key in host], dtype=torch.float64)
    moved = dict(zip(host, host_values.to(device).unbind(0))) if host else {}
    return {key: moved[key] if key in moved else _as_double(output[key]).to(device) for key in keys}
