"""One whole stage-2 pre-training update, ours against stock fairseq's closest equivalent.

Ours: the real objects of a ``fairseq-train`` run, ``SlamPretrainingTask.train_step`` with the
``slam`` model (``--arch`` preset) and the ``slam_multitask`` criterion, on one speech batch (MSM),
one text batch (span masking) and one pair batch (TLM + STM, and pair CTC with ``--pair-ctc``),
built in memory the way the task's collaters build them (masks of the task's default
probabilities); forward, one backward per modality, then an Adam step.

Stock: the same width, depth, heads, FFN size, kernel and dropout rates in fairseq 0.12's own
modules, doing the same passes in the same order, with an Adam step. Stock's
``ConformerEncoderLayer`` takes one rate for every dropout; its attention-probability and
FFN-activation dropouts are set to ours (``slam_tiny`` has none of either) and so are the
``TransformerEncoder``'s, and the speech layers' input is dropped out as in ``s2t_conformer``'s
encoder (and ours), so that both sides draw random masks of the same sizes at the same rates:

- speech: ``Conv1dSubsampler`` (s2t_conformer's 4x subsampling), N + M ``ConformerEncoderLayer``
  (s2t_conformer's layer, absolute positions, fairseq ``MultiheadAttention``), a linear code head on
  the masked frames (cross-entropy);
- text: fairseq's ``TransformerEncoder`` (M layers, embed_tokens tied to a linear output head) on the
  text batch, cross-entropy on the masked tokens;
- pair: N speech layers on the masked speech, M Conformer layers on [speech ; text embeddings]
  (TLM: code head at masked frames + text head at masked tokens), N speech layers on the unmasked
  speech, M layers on [that ; the matched text] mean-pooled into a 2-way classifier (STM), and,
  with ``--pair-ctc``, M layers on the unmasked speech alone into a CTC head.

Why it is fair: both sides run the same number of Conformer / Transformer layers of the same size
on the same number of positions per pass, the same heads (token vocabulary, codebook), and a
backward pass per modality; the differences are what a user gets from each codebase (ours: 2-D
subsampling, RoPE + SDPA, masked GroupNorm, the quantizer, contrastive loss, and on a CPU a dropout
that draws 16 random bits per element; stock: 1-D subsampling, fairseq attention, BatchNorm,
``bernoulli_`` dropout masks). Stock does not quantize (its code targets are random),
which favours stock.

Timing is interleaved (ours, stock, ours, stock ...), medians of each and of the paired ratios.
Reported: updates/s, seconds of audio (speech + pair batches, 10 ms frames) per second, peak memory
(CPU: VmHWM from /proc/self/status, reset through /proc/self/clear_refs before each side's
measured update; CUDA: ``torch.cuda.max_memory_allocated``). Both sides live in one process, so
that peak holds the other side's weights, gradients and Adam state too; each side's own peak is
what it holds between updates (its weights, gradients and optimizer state) plus the update's own
share (the peak minus what was resident before the update), which is set against what the update
needs on top: the gradients and the most that autograd's saved tensors hold at once (counted with
``saved_tensors_hooks``, once per storage), FLOPs per update counted with
``torch.utils.flop_counter.FlopCounterMode`` and the MFU they imply against ``--peak-tflops``, and
the operators dispatched per update that compute (views, reshapes and detaches left out): on a GPU
each launches at least one kernel, so at small shapes their count, not the FLOPs, sets the pace.
``--curves`` adds the time per update over batch size and utterance length; ``--json PATH``
writes every figure to PATH. The last line is ``ratio ours/stock: X``, the throughput ratio
(stock time / our time).

    python benchmarks/bench_pretraining.py                       # small CPU case, a few minutes
    python benchmarks/bench_pretraining.py --arch slam_paper --device cuda --dtype bf16 --peak-tflops 989
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from interleaved_timing import interleaved as interleaved_times

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("fp32", "bf16", "fp16")


# -- memory ---------------------------------------------------------------------------------------
def read_proc_status_kib(key: str) -> Optional[int]:
    """A ``/proc/self/status`` value in kiB (None off Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak_mib(step: Callable[[], None], device) -> float:
    """Peak memory of one ``step``: CUDA max allocated, or the process's VmHWM on CPU (MiB)."""
    return measure_memory_mib(step, device)[1]


def measure_memory_mib(step: Callable[[], None], device) -> Tuple[float, float]:
    """(memory right before ``step``, peak during it), MiB: CUDA allocated, or on CPU the process's
    VmRSS once freed heap pages are returned (so that it is live memory) and VmHWM (NaN where the
    peak cannot be reset)."""
    import torch

    from slam_fairseq.host_memory import trim_heap

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return before / 2 ** 20, torch.cuda.max_memory_allocated() / 2 ** 20
    trim_heap()
    if not reset_peak_rss():
        step()
        return float("nan"), float("nan")
    before = read_proc_status_kib("VmRSS")
    step()
    peak = read_proc_status_kib("VmHWM")
    if before is None or peak is None:
        return float("nan"), float("nan")
    return before / 1024, peak / 1024


def held_mib(model, optimizer) -> float:
    """What one side holds between updates (MiB): its weights, their gradients and the
    optimizer's state, each storage counted once."""
    import torch

    tensors = [tensor for parameter in model.parameters() for tensor in (parameter, parameter.grad)
               if tensor is not None]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    return sum(storages.values()) / 2 ** 20


def saved_activation_mib(step: Callable[[], None], parameters) -> float:
    """The most memory that tensors saved for backward hold at once during ``step`` (MiB).

    Autograd's saved tensors, counted once per storage and without the parameters' own storages,
    grouped by backward pass: a group ends when a backward has started reading them (both sides
    run one backward per modality, which frees that modality's saved tensors)."""
    import torch

    parameter_storages = {parameter.untyped_storage().data_ptr() for parameter in parameters}
    groups: List[int] = []
    current: Dict[int, int] = {}
    unpacked = [False]

    def pack(tensor):
        if unpacked[0]:
            groups.append(sum(current.values()))
            current.clear()
            unpacked[0] = False
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # opaque tensors (mkldnn) have no storage
            return tensor
        if storage.data_ptr() not in parameter_storages:
            current[storage.data_ptr()] = storage.nbytes()
        return tensor

    def unpack(tensor):
        unpacked[0] = True
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step()
    groups.append(sum(current.values()))
    return max(groups) / 2 ** 20


# -- batches --------------------------------------------------------------------------------------
def _span_mask(lengths, width: int, probability: float, span: int, generator):
    """(B, width) bool: spans of ``span`` starting with ``probability`` inside each row's length
    (at least one masked position per row), as the task's frame and token masking."""
    import torch

    starts = (torch.rand(len(lengths), width, generator=generator) < probability)
    real = torch.arange(width)[None, :] < lengths[:, None]
    starts &= real
    starts[:, 0] |= ~starts.any(dim=1)
    mask = torch.zeros_like(starts)
    for offset in range(span):
        mask[:, offset:] |= starts[:, : width - offset]
    return mask & real


def make_batches(batch_speech: int, batch_text: int, batch_pair: int, frames: int, tokens: int,
                 pair_tokens: int, spread: float, vocab_size: int, nspecial: int, pad: int, mask_index: int,
                 seed: int = 0) -> Dict[str, dict]:
    """Speech, text and pair batches in the layout of docs/pretraining_batches.md.

    Lengths fall evenly between ``(1 - spread)`` times and the full ``frames``/``tokens`` (a length
    bucket). Masks: MSM 0.065 x 10 (about 49% of subsampled frames), span masking 15% in spans of
    5 (the task's defaults, here drawn per position), TLM 0.13 x 10 (about 75%) and 50% of the text.
    """
    import torch

    from slam_fairseq.data.pretraining.collate import nonzero_index, target_index
    from slam_fairseq.modules.subsampling import subsampled_lengths

    generator = torch.Generator().manual_seed(seed)

    def lengths(count: int, longest: int):
        return torch.linspace(max(7, longest * (1 - spread)), longest, count).round().long().flip(0)

    def speech_part(count: int, mask_probability: float):
        feature_lengths = lengths(count, frames)
        features = torch.randn(count, int(feature_lengths.max()), 80, generator=generator)
        features.masked_fill_(torch.arange(features.shape[1])[None, :, None] >= feature_lengths[:, None, None], 0)
        sub = subsampled_lengths(feature_lengths)
        frame_mask = _span_mask(sub, int(sub.max()), mask_probability, 10, generator)
        return {"id": torch.arange(count), "features": features, "feature_lengths": feature_lengths,
                "frame_mask": frame_mask, "masked_frames": nonzero_index(frame_mask),
                "lengths_on_host": {"speech": tuple(sub.tolist())}, "nframes": int(sub.sum())}

    def text_part(count: int, longest: int, probability: float, span: int):
        token_lengths = lengths(count, longest).clamp(min=2)
        clean = torch.randint(nspecial, vocab_size, (count, int(token_lengths.max())), generator=generator)
        clean.masked_fill_(torch.arange(clean.shape[1])[None, :] >= token_lengths[:, None], pad)
        masked = _span_mask(token_lengths, clean.shape[1], probability / span, span, generator)
        return clean, clean.masked_fill(masked, mask_index), clean.masked_fill(~masked, pad), token_lengths

    speech = speech_part(batch_speech, 0.065)
    _, text_tokens, text_target, text_lengths = text_part(batch_text, tokens, 0.15, 5)
    text = {"id": torch.arange(batch_text), "tokens": text_tokens, "target": text_target,
            "target_index": target_index(text_target, pad),
            "lengths_on_host": {"text": tuple(text_lengths.tolist())}, "ntokens": int(text_lengths.sum())}
    pair = speech_part(batch_pair, 0.13)
    clean, pair_tokens_masked, pair_target, pair_lengths = text_part(batch_pair, pair_tokens, 0.5, 5)
    stm_text_index = torch.arange(batch_pair)
    stm_text_index[1::2] = stm_text_index[1::2].roll(1) if batch_pair > 2 else stm_text_index[1::2]
    pair.update(tokens=pair_tokens_masked, target=pair_target, target_index=target_index(pair_target, pad),
                clean_tokens=clean,
                stm_text_index=stm_text_index, stm_label=(stm_text_index == torch.arange(batch_pair)).long(),
                ntokens=int(pair_lengths.sum()))
    pair["lengths_on_host"].update(text=tuple(pair_lengths.tolist()),
                                   stm_text=tuple(pair_lengths[stm_text_index].tolist()))
    return {"speech": speech, "text": text, "pair": pair}


def audio_seconds(sample: Dict[str, dict]) -> float:
    """Seconds of speech in an update (10 ms feature frames of the speech and pair batches)."""
    return sum(float(sample[name]["feature_lengths"].sum()) for name in ("speech", "pair")) / 100.0


def _to_device(sample, device):
    import torch

    return {name: {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}
            for name, batch in sample.items()}


# -- our side -------------------------------------------------------------------------------------
class _Optimizer:
    """What ``train_step`` needs of a fairseq optimizer (``backward``), around ``torch.optim.Adam``."""

    def __init__(self, parameters) -> None:
        import torch

        self.optimizer = torch.optim.Adam(parameters, lr=1e-4)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def _write_dictionary(directory: Path, vocab_size: int) -> None:
    """config.yaml and a fairseq dictionary of ``vocab_size`` symbols (with the 4 specials and <mask>)."""
    symbols = max(1, vocab_size - 5)
    (directory / "dict.txt").write_text("".join(f"w{index} 1\n" for index in range(symbols)), encoding="utf-8")
    (directory / "config.yaml").write_text("input_feat_per_channel: 80\nvocab_filename: dict.txt\n",
                                           encoding="utf-8")


class OurUpdate:
    """The task, model, criterion and optimizer of a stage-2 ``fairseq-train`` run."""

    def __init__(self, args: argparse.Namespace, device, vocab_dir: Path, checkpoint_activations: bool = False) -> None:
        import torch

        import slam_fairseq  # noqa: F401  (registers task, model, criterion)
        from fairseq.models import ARCH_CONFIG_REGISTRY

        from slam_fairseq.criterions.slam_multitask import SlamMultitaskCriterion, SlamMultitaskCriterionConfig
        from slam_fairseq.data.pretraining.config import PretrainingDataConfig
        from slam_fairseq.encoders.config import config_from
        from slam_fairseq.models.slam import SlamConfig, SlamModel
        from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask

        _write_dictionary(vocab_dir, args.vocab_size)
        cfg = SlamPretrainingConfig(data=str(vocab_dir), stage2_start_update=0, seed=1, max_update=0,
                                    train_subset="train")
        self.task = SlamPretrainingTask(cfg, PretrainingDataConfig(str(vocab_dir)))
        namespace = argparse.Namespace(**model_overrides(args), pair_ctc=args.pair_ctc,
                                       pair_ctc_units="tokens", compile_layers=args.compile_layers,
                                       checkpoint_activations=checkpoint_activations)
        ARCH_CONFIG_REGISTRY[args.arch](namespace)
        self.model = SlamModel.build_model(namespace, self.task).to(device)
        self.criterion = SlamMultitaskCriterion(SlamMultitaskCriterionConfig(), self.task)
        self.optimizer = _Optimizer(self.model.parameters())
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.device = device
        self.sizes = config_from(namespace, SlamConfig)  # every field: presets leave defaults unset

    def __call__(self, sample) -> None:
        import torch

        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        self.optimizer.zero_grad()
        with autocast:
            self.task.train_step(sample, self.model, self.criterion, self.optimizer, update_num=0)
        self.optimizer.step()

    def parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def held_mib(self) -> float:
        return held_mib(self.model, self.optimizer.optimizer)


# -- stock side -----------------------------------------------------------------------------------
def build_stock_model(sizes, vocab_size: int, pad: int, codebook_size: int, pair_ctc: bool):
    """fairseq 0.12 modules at our sizes (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fairseq.data import Dictionary
    from fairseq.models.speech_to_text.modules.convolution import Conv1dSubsampler
    from fairseq.models.transformer import TransformerConfig, TransformerEncoderBase
    from fairseq.modules import PositionalEmbedding
    from fairseq.modules.conformer_layer import ConformerEncoderLayer

    dim, ffn, heads = sizes.encoder_embed_dim, sizes.encoder_ffn_embed_dim, sizes.encoder_attention_heads
    kernel, dropout = sizes.conv_kernel_size, sizes.dropout

    def conformer(count: int) -> nn.ModuleList:
        layers = nn.ModuleList(ConformerEncoderLayer(dim, ffn, heads, dropout=dropout, use_fp16=False,
                                                     depthwise_conv_kernel_size=kernel)
                               for _ in range(count))
        for layer in layers:  # stock takes one rate for all; set each role's rate to ours
            layer.self_attn.dropout_module.p = sizes.attention_dropout
            layer.ffn1.dropout1.p = layer.ffn2.dropout1.p = sizes.activation_dropout
        return layers

    dictionary = Dictionary()
    for index in range(vocab_size - len(dictionary)):
        dictionary.add_symbol(f"w{index}")
    transformer_cfg = TransformerConfig()
    transformer_cfg.encoder.embed_dim, transformer_cfg.encoder.ffn_embed_dim = dim, ffn
    transformer_cfg.encoder.attention_heads = heads
    transformer_cfg.encoder.layers = sizes.multimodal_encoder_layers
    transformer_cfg.dropout = dropout
    transformer_cfg.attention_dropout = sizes.attention_dropout
    transformer_cfg.activation_dropout = sizes.activation_dropout
    transformer_cfg.encoder.normalize_before = True

    class StockPretraining(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.subsample = Conv1dSubsampler(80, sizes.subsampling_conv_channels * 4, dim, [5, 5])
            self.speech_positions = PositionalEmbedding(6000, dim, pad)
            self.speech_layers = conformer(sizes.speech_encoder_layers)
            self.joint_layers = conformer(sizes.multimodal_encoder_layers)
            self.embed_tokens = nn.Embedding(len(dictionary), dim, pad)
            self.text_encoder = TransformerEncoderBase(transformer_cfg, dictionary, self.embed_tokens)
            self.code_head = nn.Linear(dim, codebook_size)
            self.text_bias = nn.Parameter(torch.zeros(len(dictionary)))
            self.matching = nn.Linear(dim, 2)
            self.ctc_head = nn.Linear(dim, len(dictionary)) if pair_ctc else None

        def speech(self, features, lengths):
            """(T', B, D) after subsampling and the speech layers, and the (B, T') padding mask."""
            hidden, out_lengths = self.subsample(features, lengths)
            padding = torch.arange(hidden.shape[0], device=hidden.device)[None, :] >= out_lengths[:, None]
            hidden = hidden + self.speech_positions(padding.long()).transpose(0, 1)
            hidden = F.dropout(hidden, dropout, self.training)  # s2t_conformer's input dropout (ours has one too)
            for layer in self.speech_layers:
                hidden, _ = layer(hidden, padding)
            return hidden, padding

        def joint(self, hidden, padding):
            for layer in self.joint_layers:
                hidden, _ = layer(hidden, padding)
            return hidden

        def text_logits(self, hidden):
            return F.linear(hidden, self.embed_tokens.weight, self.text_bias)

        def pair_input(self, speech, speech_padding, tokens):
            text = self.embed_tokens(tokens).transpose(0, 1)
            return torch.cat((speech, text), 0), torch.cat((speech_padding, tokens.eq(pad)), 1)

        def loss_speech(self, batch):
            hidden, padding = self.speech(batch["features"], batch["feature_lengths"])
            hidden = self.joint(hidden, padding).transpose(0, 1)
            mask = _fit(batch["frame_mask"], hidden.shape[1]) & ~padding
            logits = self.code_head(hidden[mask])
            return F.cross_entropy(logits.float(), torch.randint(codebook_size, logits.shape[:1], device=logits.device))

        def loss_text(self, batch):
            output = self.text_encoder(batch["tokens"])["encoder_out"][0].transpose(0, 1)
            mask = batch["target"].ne(pad)
            return F.cross_entropy(self.text_logits(output[mask]).float(), batch["target"][mask])

        def loss_pair(self, batch):
            features, lengths = batch["features"], batch["feature_lengths"]
            speech, padding = self.speech(features, lengths)  # masked speech (stock has no mask embedding)
            joint = self.joint(*self.pair_input(speech, padding, batch["tokens"])).transpose(0, 1)
            frames = speech.shape[0]
            frame_mask = _fit(batch["frame_mask"], frames) & ~padding
            codes = self.code_head(joint[:, :frames][frame_mask])
            loss = F.cross_entropy(codes.float(), torch.randint(codebook_size, codes.shape[:1], device=codes.device))
            text_mask = batch["target"].ne(pad)
            loss = loss + F.cross_entropy(self.text_logits(joint[:, frames:][text_mask]).float(),
                                          batch["target"][text_mask])
            unmasked, padding = self.speech(features, lengths)
            matched_tokens = batch["clean_tokens"][batch["stm_text_index"]]
            joint_input, joint_padding = self.pair_input(unmasked, padding, matched_tokens)
            matched = self.joint(joint_input, joint_padding).transpose(0, 1)
            real = (~joint_padding).unsqueeze(-1).to(matched.dtype)
            pooled = (matched * real).sum(1) / real.sum(1)
            loss = loss + F.cross_entropy(self.matching(pooled).float(), batch["stm_label"])
            if self.ctc_head is not None:
                alone = self.joint(unmasked, padding)
                log_probs = F.log_softmax(self.ctc_head(alone).float(), dim=-1)
                targets = batch["clean_tokens"]
                loss = loss + F.ctc_loss(log_probs, targets, (~padding).sum(1), targets.ne(pad).sum(1),
                                         blank=0, zero_infinity=True)
            return loss

    return StockPretraining()


def _fit(mask, width: int):
    import torch

    if mask.shape[1] >= width:
        return mask[:, :width]
    return torch.cat((mask, mask.new_zeros(mask.shape[0], width - mask.shape[1])), 1)


class StockUpdate:
    """The stock model with one backward per modality, then an Adam step."""

    def __init__(self, sizes, args: argparse.Namespace, device) -> None:
        import torch

        self.model = build_stock_model(sizes, args.vocab_size, 1, sizes.quantizer_codebook_size,
                                       args.pair_ctc).to(device).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.device = device

    def __call__(self, sample) -> None:
        import torch

        self.optimizer.zero_grad(set_to_none=True)
        for name in ("speech", "text", "pair"):
            autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
            with autocast:
                loss = getattr(self.model, f"loss_{name}")(sample[name])
            loss.backward()
        self.optimizer.step()

    def parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def held_mib(self) -> float:
        return held_mib(self.model, self.optimizer)


# -- measuring ------------------------------------------------------------------------------------
def model_overrides(args: argparse.Namespace) -> Dict[str, object]:
    """Sizes given on the command line (the rest come from ``--arch``)."""
    names = {"embed_dim": "encoder_embed_dim", "ffn_dim": "encoder_ffn_embed_dim",
             "heads": "encoder_attention_heads", "speech_layers": "speech_encoder_layers",
             "multimodal_layers": "multimodal_encoder_layers", "conv_channels": "subsampling_conv_channels"}
    return {field: getattr(args, name) for name, field in names.items() if getattr(args, name) is not None}


def interleaved(ours: Callable[[], None], stock: Callable[[], None], repeats: int, device):
    """Median seconds of each and median of the paired ratios stock/ours, timed ours, stock, ..."""
    ours_times, stock_times = interleaved_times(ours, stock, repeats, device)
    ratios = [s / o for o, s in zip(ours_times, stock_times)]
    return statistics.median(ours_times), statistics.median(stock_times), statistics.median(ratios)


def count_flops(step: Callable[[], None]) -> float:
    """FLOPs of one call (forward + backward + optimizer), by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def count_compute_ops(step: Callable[[], None]) -> int:
    """ATen operators of one call (forward + backward + optimizer) that produce new data: every
    dispatched operator except views (``OpOverload.is_view``: aliases of their input) and detach."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
                self.count += 1
            return func(*args, **(kwargs or {}))

    counter = _Counter()
    with counter:
        step()
    return counter.count


# Datasheet dense (no sparsity) bf16/fp16 tensor-core peaks, TFLOP/s, matched in this order
# against the CUDA device name (case-insensitive).
DENSE_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                     ("H200", 989.0))


def datasheet_peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of a known GPU from its name (``torch.cuda.get_device_name``), else None."""
    for part, tflops in DENSE_BF16_TFLOPS:
        if part.lower() in device_name.lower():
            return tflops
    return None


def nominal_cpu_tflops(threads: int) -> float:
    """32 fp32 FLOPs per cycle per core (AVX2 FMA) at 2.5 GHz, times ``threads``."""
    return threads * 32 * 2.5e9 / 1e12


#: the dense bf16 TFLOP/s assumed for a GPU whose name the datasheet table does not know (H100 SXM's)
UNKNOWN_GPU_PEAK_TFLOPS = 989.0


def default_peak_tflops(device, dtype: str) -> float:
    """A peak when none is given: on CUDA the datasheet's dense bf16/fp16 figure for the device's
    name (an unknown GPU: H100 SXM's 989), fp32 67 (H100 SXM); on CPU the nominal figure for the
    threads torch uses."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return (datasheet_peak_tflops(name) or UNKNOWN_GPU_PEAK_TFLOPS) if dtype != "fp32" else 67.0
    return nominal_cpu_tflops(torch.get_num_threads())


def build_ours(args: argparse.Namespace, device, checkpoint_activations: bool = False) -> "OurUpdate":
    """Our side, its dictionary written to a temporary folder (the task keeps it in memory)."""
    with tempfile.TemporaryDirectory() as vocab_dir:
        return OurUpdate(args, device, Path(vocab_dir), checkpoint_activations=checkpoint_activations)


def build_sides(args: argparse.Namespace, device) -> Tuple["OurUpdate", "StockUpdate"]:
    """Both sides, from the same seed."""
    import torch

    torch.manual_seed(0)
    ours = build_ours(args, device)
    return ours, StockUpdate(ours.sizes, args, device)


def device_sample(ours: "OurUpdate", batches: Dict[str, int], frames: int, tokens: int, length_spread: float,
                  device, dtype: str):
    """A stage-2 sample for ``ours``'s dictionary (:func:`make_batches`) on ``device``, the features
    in ``dtype`` (the other tensors are indices and lengths)."""
    import torch

    dictionary = ours.task.source_dictionary
    sample = _to_device(make_batches(batches["speech"], batches["text"], batches["pair"], frames, tokens,
                                     max(2, frames // 30), length_spread, len(dictionary) - 1, dictionary.nspecial,
                                     dictionary.pad(), dictionary.index("<mask>")), device)
    if dtype != "fp32":
        for name in ("speech", "pair"):
            sample[name]["features"] = sample[name]["features"].to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    return sample


def measure(args: argparse.Namespace, device, batches: Dict[str, int], frames: int, tokens: int,
            repeats: int, with_memory: bool = True, with_flops: bool = True,
            sides: Optional[Tuple["OurUpdate", "StockUpdate"]] = None) -> Dict[str, float]:
    """Time both sides (built here, or ``sides``) interleaved on one sample; gather every figure."""
    ours, stock = sides if sides is not None else build_sides(args, device)
    sample = device_sample(ours, batches, frames, tokens, args.length_spread, device, args.dtype)
    seconds = audio_seconds(sample)
    ours_s, stock_s, ratio = interleaved(lambda: ours(sample), lambda: stock(sample), repeats, device)
    results = {"ours_s": ours_s, "stock_s": stock_s, "ratio": ratio, "audio_s": seconds,
               "ours_params": ours.parameters(), "stock_params": stock.parameters()}
    if with_memory:
        for side, update in (("ours", ours), ("stock", stock)):
            step = lambda update=update: update(sample)  # noqa: E731
            held = update.held_mib()
            before, peak = measure_memory_mib(step, device)
            parameters = list(update.model.parameters())
            # the process's peak holds both sides; the side's own peak is what it holds plus the update's share
            results[f"{side}_process_peak_mib"] = peak
            results[f"{side}_step_mib"] = peak - before
            results[f"{side}_held_mib"] = held
            results[f"{side}_own_peak_mib"] = held + peak - before
            results[f"{side}_weights_mib"] = sum(p.numel() * p.element_size() for p in parameters) / 2 ** 20
            results[f"{side}_activation_mib"] = saved_activation_mib(step, parameters)
    if with_flops:
        peak = args.peak_tflops or default_peak_tflops(device, args.dtype)
        results["peak_tflops"] = peak
        for side, step in (("ours", lambda: ours(sample)), ("stock", lambda: stock(sample))):
            flops = count_flops(step)
            results[f"{side}_ops"] = count_compute_ops(step)
            results[f"{side}_flops"] = flops
            results[f"{side}_mfu"] = flops / results[f"{side}_s"] / (peak * 1e12)
    return results


def curves(args: argparse.Namespace, device) -> List[Dict[str, float]]:
    """Time per update over batch size (x1, x2, x4) and utterance length (x0.5, x1, x2)."""
    rows = []
    sides = build_sides(args, device)  # one pair of models for every point
    base = {"speech": args.batch_speech, "text": args.batch_text, "pair": args.batch_pair}
    for scale in (1, 2, 4):
        batches = {name: value * scale for name, value in base.items()}
        result = measure(args, device, batches, args.frames, args.tokens, max(2, args.repeats // 2), False, False,
                         sides=sides)
        rows.append({"kind": "batch", "scale": scale, **result})
    for scale in (0.5, 1, 2):
        result = measure(args, device, base, int(args.frames * scale), max(2, int(args.tokens * scale)),
                         max(2, args.repeats // 2), False, False, sides=sides)
        rows.append({"kind": "length", "scale": scale, **result})
    return rows


def _growth(rows: List[Dict[str, float]], kind: str, side: str) -> float:
    """Log-log slope of time per update against the scale (1: linear)."""
    picked = [row for row in rows if row["kind"] == kind]
    first, last = picked[0], picked[-1]
    return math.log(last[f"{side}_s"] / first[f"{side}_s"]) / math.log(last["scale"] / first["scale"])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="slam_tiny", help="a slam preset (slam_tiny, slam_paper)")
    parser.add_argument("--embed-dim", type=int, help="override the preset's width")
    parser.add_argument("--ffn-dim", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--speech-layers", type=int)
    parser.add_argument("--multimodal-layers", type=int)
    parser.add_argument("--conv-channels", type=int)
    parser.add_argument("--vocab-size", type=int, default=1000, help="text vocabulary")
    parser.add_argument("--pair-ctc", action="store_true", help="add mSLAM's pair CTC (ours and stock)")
    parser.add_argument("--compile-layers", action="store_true", help="our model's --compile-layers")
    parser.add_argument("--batch-speech", type=int, default=8, help="utterances per speech batch")
    parser.add_argument("--batch-text", type=int, default=16, help="sentences per text batch")
    parser.add_argument("--batch-pair", type=int, default=8, help="pairs per pair batch")
    parser.add_argument("--frames", type=int, default=600, help="longest utterance, 10 ms frames")
    parser.add_argument("--tokens", type=int, default=48, help="longest text sentence, tokens")
    parser.add_argument("--length-spread", type=float, default=0.2,
                        help="shortest row = (1 - spread) x longest, as in a length bucket")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak TFLOP/s for MFU (0: a nominal one, see default_peak_tflops)")
    parser.add_argument("--curves", action="store_true", help="also time over batch size and utterance length")
    parser.add_argument("--json", type=Path, help="write every figure (and the curves' rows) to this file")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI (tiny batches, 2 repeats)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_speech, args.batch_text, args.batch_pair = 2, 2, 2
        args.frames, args.tokens, args.repeats, args.vocab_size = 120, 12, 2, 100
    return args


def main(argv: Optional[List[str]] = None) -> float:
    args = parse_args(argv)
    import torch

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = {"speech": args.batch_speech, "text": args.batch_text, "pair": args.batch_pair}
    results = measure(args, device, batches, args.frames, args.tokens, args.repeats)
    print(f"stage-2 update: {args.arch} {model_overrides(args) or ''} pair_ctc={args.pair_ctc}, "
          f"{device} {args.dtype}, {torch.get_num_threads()} threads, batches speech {args.batch_speech} / "
          f"text {args.batch_text} / pair {args.batch_pair}, up to {args.frames} frames, {args.tokens} tokens")
    print(f"parameters: ours {results['ours_params']:,}, stock {results['stock_params']:,}")
    print(f"computing operators dispatched per update (views and detaches left out): ours {results['ours_ops']:,}, "
          f"stock {results['stock_ops']:,}")
    for side in ("ours", "stock"):
        seconds = results[f"{side}_s"]
        print(f"{side:5s}: {1 / seconds:.3f} updates/s, {results['audio_s'] / seconds:.1f} s of audio per s, "
              f"own peak {results[f'{side}_own_peak_mib']:.0f} MiB (held {results[f'{side}_held_mib']:.0f} + the "
              f"update's {results[f'{side}_step_mib']:.0f}; process peak with both sides held "
              f"{results[f'{side}_process_peak_mib']:.0f}), {results[f'{side}_flops'] / 1e9:.2f} GFLOP/update, "
              f"MFU {100 * results[f'{side}_mfu']:.2f}% of {results['peak_tflops']:.3g} TFLOP/s")
    for side in ("ours", "stock"):
        # During the update, on top of what was resident before it: the gradients (one copy of the
        # weights) and the saved activations; the weights and Adam's two moments stay resident.
        need = results[f"{side}_weights_mib"] + results[f"{side}_activation_mib"]
        print(f"memory {side}: the update's own peak (peak minus before it) {results[f'{side}_step_mib']:.0f} MiB "
              f"against {need:.0f} MiB of gradients ({results[f'{side}_weights_mib']:.1f}) and saved activations "
              f"({results[f'{side}_activation_mib']:.0f}): {results[f'{side}_step_mib'] / need:.2f}x; weights + Adam "
              f"state {3 * results[f'{side}_weights_mib']:.1f} MiB")
    rows: List[Dict[str, float]] = []
    if args.curves:
        rows = curves(args, device)
        print("curve  scale  ours_s  stock_s  ratio")
        for row in rows:
            print(f"{row['kind']:6s} {row['scale']:5g}  {row['ours_s']:.3f}  {row['stock_s']:.3f}  {row['ratio']:.2f}")
        for kind in ("batch", "length"):
            print(f"growth over {kind} (log-log slope, 1 = linear): ours {_growth(rows, kind, 'ours'):.2f}, "
                  f"stock {_growth(rows, kind, 'stock'):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "device": str(device), "dtype": args.dtype, **results,
                                         "curves": rows}, indent=2), encoding="utf-8")
    print(f"ratio ours/stock: {results['ratio']:.2f}")
    return results["ratio"]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
