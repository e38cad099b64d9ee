"""Loading a checkpoint trained with an optional head switched the other way.

``--pair-ctc`` adds ``pair_ctc_head`` to the ``slam`` model. A stage-1 run usually trains without
it, and stage 2 may turn it on (or a run may leave it off after a checkpoint that had it); fairseq
loads checkpoints strictly, so the first case failed with ``Missing key(s) in state_dict:
"pair_ctc_head.weight"`` and the second with ``Unexpected key(s)``. :func:`register_optional_head`
gives the model a load-state-dict pre-hook that keeps the model's own (freshly initialised) head
where the checkpoint has none, and leaves out a checkpoint's head the model does not have, each with
a WARNING. The optimizer state of such a checkpoint is for other parameters: resuming it
(``--continue-once``, ``checkpoint_last.pt``) needs ``--reset-optimizer``; ``--finetune-from-model``
resets it anyway.
"""
from __future__ import annotations

import functools
import logging

from torch import nn

__all__ = ["register_optional_head"]

logger = logging.getLogger(__name__)


def register_optional_head(model: nn.Module, name: str, option: str) -> None:
    """Install the pre-hook for the submodule attribute ``name`` of ``model`` (None when the head is
    off); ``option`` is the flag that turns it on, for the warnings."""
    hook = functools.partial(_load_with_or_without_head, name=name, option=option)
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(hook)
    else:  # torch before 2.5: the same hook, through the private name
        model._register_load_state_dict_pre_hook(hook, with_module=True)


def _load_with_or_without_head(module: nn.Module, state_dict, prefix: str, *args, name: str, option: str) -> None:
    head = getattr(module, name, None)
    head_prefix = f"{prefix}{name}."
    saved = [key for key in state_dict if key.startswith(head_prefix)]
    others = any(key.startswith(prefix) and not key.startswith(head_prefix) for key in state_dict)
    if not others:
        return  # not a whole model's state: leave it to the strict check
    if head is not None and not saved:
        for key, value in head.state_dict(prefix=head_prefix).items():
            state_dict[key] = value.detach().clone()
        logger.warning(f"the checkpoint has no {name} (trained without {option}): this run starts it from its own "
                       f"initialisation; resuming that checkpoint's optimizer state needs --reset-optimizer")
    elif head is None and saved:
        for key in saved:
            del state_dict[key]
        logger.warning(f"the checkpoint has a {name} (trained with {option}), which this run does not use: "
                       f"left out; resuming that checkpoint's optimizer state needs --reset-optimizer")
