"""A non-finite loss in any modality skips the whole update, on every rank, and is counted.

``slam_pretraining`` runs one backward pass per modality. fairseq's own guard sees only the summed
gradient: in FP32 a NaN or inf gradient norm raises ``FloatingPointError`` and ends the run; with
``--fp16`` it is taken for a loss-scale overflow. :class:`NonFiniteUpdateGuard` acts earlier, on
each modality's loss:

1. :meth:`loss_for_backward`: a loss that is not finite is replaced by a zero with the same graph
   (``torch.where`` on the device: no host read per modality), so the backward pass reaches the
   parameters a finite loss would reach and DDP's reducer stays in step; the modality's finiteness
   is kept as a device flag. The gradients of such a pass may hold NaNs (0 x inf on the way back):
   step 2 removes them before fairseq's all-reduce (``legacy_ddp``, which the launcher sets).
2. :meth:`after_backward`: the flags of all modalities are read once (one host read per update);
   if any modality was not finite, the gradients are zeroed, so the gradient norm fairseq computes
   next is finite (no ``FloatingPointError``, no false overflow).
3. :meth:`skip_update` (from the task's ``optimizer_step``): with several ranks the decision is
   all-reduced (one rank's NaN skips the update everywhere, so the weights stay identical); when
   skipped, ``optimizer.step()`` is not called: parameters and optimizer state (Adam's moments,
   its step count, the FP16 loss scale) stay as they were. fairseq still counts the update and
   steps the learning-rate schedule.

The count is logged as ``nonfinite_updates`` (cumulative, from the first skipped update on) with a
WARNING naming the update and the modalities. A non-finite modality's logged values are zeroed
(:meth:`logged`, from the flags step 2 reads anyway), so that one skipped update leaves the epoch's
logged losses finite.

A non-finite modality in one ``--update-freq`` step of an update that fairseq then abandons
without an optimizer step (out of memory in one process) stays pending: the next update is
skipped too.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteUpdateGuard"]


def _zero(value: Any) -> Any:
    """A logged value's zero: of the same tensor type, or 0 for a number (a string as it is)."""
    if torch.is_tensor(value):
        return torch.zeros_like(value)
    return 0 if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class NonFiniteUpdateGuard:
    """Per-update bookkeeping of non-finite modality losses (see the module docstring)."""

    def __init__(self) -> None:
        self.pending: List[str] = []
        self.num_skipped_updates = 0
        self._flags: List[Tuple[str, torch.Tensor]] = []
        #: the modalities of the last step whose loss was not finite
        self.step_nonfinite: List[str] = []

    def loss_for_backward(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` where it is finite, else a zero over the same graph (chosen on the device)."""
        finite = torch.isfinite(loss.detach()).all()
        self._flags.append((name, finite))
        return torch.where(finite, loss, torch.zeros_like(loss))

    def logged(self, names: List[str], logging_outputs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The step's logging outputs (one per modality in ``names``), call after
        :meth:`after_backward`: a modality whose loss was not finite in this step has every value
        zeroed, sums and counts alike, so that its objectives, sizes and quantizer figures leave
        it out; the step's ``loss`` then sums its other modalities. The others are returned as
        they are, so a finite step costs nothing."""
        return [{key: _zero(value) for key, value in output.items()} if name in self.step_nonfinite else output
                for name, output in zip(names, logging_outputs)]

    def after_backward(self, optimizer) -> None:
        """Read the step's flags once; zero the gradients when one of its modalities was not finite."""
        self.step_nonfinite = []
        if self._flags:
            names = [name for name, _ in self._flags]
            finite = torch.stack([flag for _, flag in self._flags]).tolist()
            self.step_nonfinite = [name for name, ok in zip(names, finite) if not ok]
            self.pending += self.step_nonfinite
            self._flags = []
        if self.pending:
            optimizer.zero_grad()

    def skip_update(self, model: torch.nn.Module, update_num: int) -> bool:
        """Whether the coming optimizer step must be skipped (agreed by all ranks); resets the step."""
        skip = bool(self.pending)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            flag = torch.tensor([1.0 if skip else 0.0], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            skip = bool(flag.item() > 0)
        modalities, self.pending = self.pending, []
        if skip:
            self.num_skipped_updates += 1
            where = ", ".join(modalities) if modalities else "another rank"
            logger.warning(f"update {update_num + 1} skipped: non-finite loss in {where} "
                           f"({self.num_skipped_updates} skipped so far); weights and optimizer state unchanged")
        return skip

    def log(self) -> None:
        """Log the cumulative count as ``nonfinite_updates`` once an update was skipped."""
        from fairseq import metrics

        if self.num_skipped_updates:
            metrics.log_scalar("nonfinite_updates", self.num_skipped_updates, weight=0, priority=320, round=0)
