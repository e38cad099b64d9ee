"""Every fairseq ``SequenceGenerator`` tells the models its beam, a beam of 1 included.

fairseq 0.12's ``EnsembleModel.set_decoder_beam_size`` calls each model's ``set_beam_size`` only
for beams above 1. ``slam_s2t`` then keeps one copy of the encoder states per sentence (beamable
cross-attention, as BART does), so a beam-1 generator built after a wider one on the same model (a
script or the hub interface calling ``translate(beam=5)`` then ``translate(beam=1)``) read the
states as if each sentence had 5 hypotheses: batches not divisible by 5 failed, the others decoded
sentences 1-4 of every group of five from sentence 0's audio. The task ``slam_speech_to_text``
reset it in its own ``build_generator``; this reset covers every task and generator.
"""
from __future__ import annotations

from slam_fairseq.compat.wrapping import wrap_once

__all__ = ["install_beam_size_reset"]


def _setting_every_beam(set_decoder_beam_size):
    def set_decoder_beam_size_including_one(self, beam_size):
        if beam_size <= 1:
            for model in getattr(self, "models", []):
                if hasattr(model, "set_beam_size"):
                    model.set_beam_size(beam_size)
            return None
        return set_decoder_beam_size(self, beam_size)

    set_decoder_beam_size_including_one.__doc__ = set_decoder_beam_size.__doc__
    return set_decoder_beam_size_including_one


def install_beam_size_reset() -> bool:
    """Patch fairseq's ``EnsembleModel.set_decoder_beam_size`` (idempotent; True when it patched)."""
    from fairseq.sequence_generator import EnsembleModel

    return wrap_once(EnsembleModel, "set_decoder_beam_size", _setting_every_beam)
