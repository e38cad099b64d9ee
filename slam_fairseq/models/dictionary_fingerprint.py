"""Which dictionary a model was trained with, kept in its checkpoint and checked when it is loaded.

A dictionary of another size is caught by the embedding shapes. One of the same size but with
other symbols (a SentencePiece model trained again on other text, with the same vocabulary size)
is not: resuming pre-training, fine-tuning on or decoding with it would run without an error
and read every token id as another piece. The models therefore hold a persistent buffer of
``FINGERPRINT_BITS`` signs (the first bits of a SHA-256 over the dictionary's symbols in order,
as +1.0 / -1.0), set from the task's dictionary when the model is built, and a load-state-dict
pre-hook that compares it with a checkpoint's: other signs are :class:`DictionaryMismatchError`.
The hook runs however the model is wrapped (fairscale's FSDP loads through ``nn.Module``'s own
machinery, not the model's ``load_state_dict``).

- A checkpoint without the entry (written before it existed, or with the entry removed on
  purpose to move a model to another dictionary) loads as before: the model keeps its own.
- A model built without a dictionary (directly, in a test) holds ``UNKNOWN`` (zeros): it accepts
  any checkpoint and takes over the checkpoint's fingerprint; a checkpoint holding ``UNKNOWN``
  leaves a model's known fingerprint in place.

Signs in a float32 tensor survive what fairseq does to every state-dict entry: fp16/bf16 casts,
the EMA (``--store-ema`` multiplies every entry by the decay, which an integer tensor refuses, and
its float32 copy drifts by rounding, by a few percent at most, never across zero) and checkpoint
averaging. fairseq's trainer reports a failed load as "Cannot load model parameters from
checkpoint ...": the error's own message is in the traceback above that line.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Sequence

import torch
from torch import nn

__all__ = ["FINGERPRINT_BITS", "UNKNOWN", "DictionaryMismatchError", "dictionary_fingerprint",
           "register_fingerprint", "set_fingerprint"]

FINGERPRINT_BITS = 128
UNKNOWN = 0.0


class DictionaryMismatchError(ValueError):
    """A checkpoint trained with another dictionary (the message says whether of the same size)."""


def dictionary_fingerprint(symbols: Sequence[str]) -> torch.Tensor:
    """(FINGERPRINT_BITS,) float32 of +1.0 / -1.0: the first bits of SHA-256 over the symbols, one
    per line."""
    digest = hashlib.sha256("\n".join(symbols).encode("utf-8")).digest()[: FINGERPRINT_BITS // 8]
    bits = [(byte >> shift) & 1 for byte in digest for shift in range(8)]
    return torch.tensor(bits, dtype=torch.float32) * 2 - 1


def register_fingerprint(model: nn.Module, name: str, what: str) -> None:
    """Give ``model`` the buffer ``name`` (``UNKNOWN`` until :func:`set_fingerprint`) and the
    pre-hook that checks it on every load. ``what`` names the dictionary in the error."""
    model.register_buffer(name, torch.full((FINGERPRINT_BITS,), UNKNOWN))
    hook = functools.partial(_check_on_load, name=name, what=what)
    if hasattr(model, "register_load_state_dict_pre_hook"):
        model.register_load_state_dict_pre_hook(hook)
    else:  # torch before 2.5: the same hook, through the private name
        model._register_load_state_dict_pre_hook(hook, with_module=True)


def set_fingerprint(model: nn.Module, name: str, symbols: Sequence[str]) -> None:
    """Record ``symbols`` (the dictionary the model is built for) in the buffer ``name``."""
    with torch.no_grad():
        getattr(model, name).copy_(dictionary_fingerprint(symbols))


def _known(fingerprint: torch.Tensor) -> bool:
    return bool((fingerprint.detach().float().abs() > 0.5).all())


def _first_resized(module: nn.Module, state_dict, prefix: str):
    """(key, checkpoint shape, model shape) of the first tensor of ``module`` whose shape in
    ``state_dict`` differs (a dictionary of another size shows in the embeddings), else None."""
    for key, own in module.state_dict(prefix=prefix, keep_vars=True).items():
        saved = state_dict.get(key)
        if torch.is_tensor(saved) and tuple(saved.shape) != tuple(own.shape):
            return key, tuple(saved.shape), tuple(own.shape)
    return None


def _check_on_load(module: nn.Module, state_dict, prefix: str, *args, name: str, what: str) -> None:
    """Load-state-dict pre-hook: keep the model's own fingerprint when the state dict has none (or
    an unknown one), take the state dict's when the model's is unknown, refuse one whose signs
    differ. ``state_dict`` is ``load_state_dict``'s own copy."""
    key = prefix + name
    own = getattr(module, name)
    saved = state_dict.get(key)
    if saved is not None and tuple(saved.shape) != tuple(own.shape):
        raise DictionaryMismatchError(f"{key}: a fingerprint of shape {tuple(saved.shape)}, expected "
                                      f"{tuple(own.shape)}")
    if saved is None or (_known(own) and not _known(saved)):
        state_dict[key] = own.detach().clone()
        return
    if not _known(own):
        return
    if not torch.equal(saved.detach().float().sign().to(own.device), own.detach().float().sign()):
        resized = _first_resized(module, state_dict, prefix)
        if resized is not None:
            key, saved_shape, own_shape = resized
            raise DictionaryMismatchError(
                f"the checkpoint was trained with another {what} than the one this run loaded, of another "
                f"size ({key}: {saved_shape} in the checkpoint, {own_shape} in this run's model). Use the "
                f"dictionary and SentencePiece model it was trained with (the files named in the config.yaml of "
                f"its data directory); to start from its encoder with another dictionary, load it with "
                f"--load-pretrained-slam-from instead")
        raise DictionaryMismatchError(
            f"the checkpoint was trained with another {what} than the one this run loaded: both hold the "
            f"same number of symbols, but not the same symbols in the same order (a SentencePiece model "
            f"or dictionary made again, e.g. from other text?). Every token id would be read as another "
            f"piece. Use the dictionary and SentencePiece model it was trained with (the files named in "
            f"the config.yaml of its data directory); to move the weights to another dictionary on "
            f"purpose, remove '{key}' from the checkpoint's model state first")
