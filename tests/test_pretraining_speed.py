"""What the speed work on the pre-training step must keep: the same outputs, few host syncs.

- the attention mask (None without padding, additive float with it) gives the boolean mask's output;
- one unmasked speech pass serves STM and pair CTC: the same outputs as three separate passes;
- a whole ``SlamPretrainingTask.train_step`` reads the device at most ``SYNC_BOUND`` times (counted
  at the ATen dispatcher on CPU: scalar reads, nonzero, boolean indexing, ...), twice on the paths
  taken on accelerators (``sync_free_paths``), with the same losses and gradients; the criterion's
  ``reduce_metrics`` reads it once;
- ``--compile-layers`` gives the eager outputs and gradients.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_slam_multitask import make_criterion, make_model, make_sample

from slam_fairseq.data.pretraining.collate import target_index
from slam_fairseq.encoders.multimodal_encoder import pack_pair
from slam_fairseq.modules.attention import RotarySelfAttention, attention_bias
from slam_fairseq.modules.conformer import ConformerStack
from slam_fairseq.modules.padding import sync_free_paths

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_pretraining  # noqa: E402
from host_syncs import SyncCounter  # noqa: E402


# -- attention masks ------------------------------------------------------------------------------
def _boolean_mask_attention(attention: RotarySelfAttention, x, padding_mask):
    """The previous formulation: SDPA with a boolean 'attend' mask."""
    batch_size, length, embed_dim = x.shape
    qkv = attention.qkv_proj(x).view(batch_size, length, 3, attention.num_heads, attention.head_dim)
    query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    query, key = attention.rotary(query, key)
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=(~padding_mask)[:, None, None, :])
    return attention.out_proj(output.transpose(1, 2).reshape(batch_size, length, embed_dim))


def test_attention_bias_is_none_without_padding_and_additive_with_it():
    assert attention_bias(torch.zeros(2, 5, dtype=torch.bool)) is None
    padding = torch.tensor([[False, False, True], [False, False, False]])
    bias = attention_bias(padding)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.float32
    assert torch.equal(bias[:, 0, 0].isinf(), padding) and (bias[~padding[:, None, None, :]] == 0).all()


def test_on_the_accelerator_paths_the_mask_is_always_made_and_pairs_pack_to_the_padded_widths():
    unpadded = torch.zeros(2, 5, dtype=torch.bool)
    speech, text = torch.randn(2, 4, 3), torch.randn(2, 3, 3)
    speech_padding = torch.tensor([[False] * 4, [False, False, True, True]])
    text_padding = torch.tensor([[False, False, True], [False] * 3])
    with sync_free_paths():
        bias = attention_bias(unpadded)
        packed, padding_mask, _, _ = pack_pair(speech, speech_padding, text, text_padding)
    assert bias is not None and torch.equal(bias, torch.zeros(2, 1, 1, 5))
    assert attention_bias(unpadded) is None  # the context ends: the CPU path again
    tight, tight_mask, _, _ = pack_pair(speech, speech_padding, text, text_padding)
    assert tight.shape[1] == 6 and packed.shape[1] == 7  # the longest row (4 + 2) against 4 + 3
    assert torch.equal(packed[:, :6], tight) and not packed[:, 6:].any() and padding_mask[:, 6:].all()
    assert torch.equal(padding_mask[:, :6], tight_mask)


def test_padding_known_on_the_host_decides_the_mask_on_every_path_and_is_checked():
    unpadded = torch.zeros(2, 5, dtype=torch.bool)
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    for paths in (contextlib.nullcontext, sync_free_paths):
        with paths():
            assert attention_bias(unpadded, padded=False) is None  # flash stays open on an accelerator
            assert torch.equal(attention_bias(padding, padded=True), attention_bias(padding))
            assert torch.equal(attention_bias(unpadded, padded=True), torch.zeros(2, 1, 1, 5))
    with pytest.raises(ValueError, match="no padding"):
        attention_bias(padding, padded=False)
    with sync_free_paths(), pytest.raises(RuntimeError, match="no padding"):  # the device assert
        attention_bias(padding, padded=False)


def test_a_packed_width_known_on_the_host_is_used_on_every_path_and_is_checked():
    speech, text = torch.randn(2, 4, 3), torch.randn(2, 3, 3)
    speech_padding = torch.tensor([[False] * 4, [False, False, True, True]])
    text_padding = torch.tensor([[False, False, True], [False] * 3])
    tight = pack_pair(speech, speech_padding, text, text_padding)  # the CPU reads the longest row: 4 + 2
    for paths in (contextlib.nullcontext, sync_free_paths):
        with paths():
            given = pack_pair(speech, speech_padding, text, text_padding, width=6)
        assert all(torch.equal(a, b) for a, b in zip(given, tight))
    with pytest.raises(ValueError, match="packed width 5"):
        pack_pair(speech, speech_padding, text, text_padding, width=5)
    with sync_free_paths(), pytest.raises(RuntimeError, match="packed width 5"):  # the device assert
        pack_pair(speech, speech_padding, text, text_padding, width=5)


@pytest.mark.parametrize("lengths", [(9, 9, 9), (9, 4, 7)])
def test_attention_output_equals_the_boolean_mask_output(lengths):
    torch.manual_seed(0)
    attention = RotarySelfAttention(16, 4).eval()
    x = torch.randn(3, 9, 16)
    padding = torch.arange(9)[None, :] >= torch.tensor(lengths)[:, None]
    expected = _boolean_mask_attention(attention, x, padding)
    assert torch.allclose(attention(x, padding), expected, atol=1e-6)
    assert torch.allclose(attention(x, padding, attention_bias(padding)), expected, atol=1e-6)
    stack = ConformerStack(2, 16, 32, 4, 3, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0).eval()
    with torch.no_grad():
        for layer in stack.layers:
            layer.attention.forward = (lambda module: lambda h, mask, bias="auto", tables=None:
                                       _boolean_mask_attention(module, h, mask))(layer.attention)
        reference = stack(x, padding)[-1]
        for layer in stack.layers:
            del layer.attention.forward
        assert torch.allclose(stack(x, padding)[-1], reference, atol=1e-5)


# -- one unmasked speech pass for STM and pair CTC ------------------------------------------------
def test_stm_and_pair_ctc_equal_separate_passes_of_the_unmasked_speech():
    model = make_model(pair_ctc=True, pair_ctc_units="tokens").eval()
    pair = make_sample()["pair"]
    output = model(pair=pair)["pair"]
    features, lengths = pair["features"], pair["feature_lengths"]
    with torch.no_grad():
        _, matched = model.encoder.encode_pair(features, lengths, pair["clean_tokens"][pair["stm_text_index"]])
        _, alone = model.encoder.encode_speech(features, lengths)
    assert torch.allclose(output.stm_logits, model.pair_matching_classifier(matched.output, matched.padding_mask),
                          atol=1e-5)
    assert torch.allclose(output.ctc_logits, model.pair_ctc_head(alone.output), atol=1e-5)


def test_pair_subsamples_once_and_runs_the_conformer_stack_twice():
    model = make_model(pair_ctc=True, pair_ctc_units="tokens").train()
    subsampling_calls, conformer_calls = [], []
    model.encoder.speech_encoder.subsampling.register_forward_hook(lambda *_: subsampling_calls.append(1))
    model.encoder.speech_encoder.conformer.register_forward_hook(lambda *_: conformer_calls.append(1))
    make_criterion()(model, {"pair": make_sample()["pair"]})[0].backward()
    assert len(subsampling_calls) == 1  # shared by the masked and the unmasked pass
    assert len(conformer_calls) == 2  # masked (TLM) and unmasked (STM + CTC)


def test_the_shared_subsampling_gives_the_gradients_of_two_separate_passes():
    """forward_pair's one subsampling pass against two full speech-encoder passes over the same pair
    batch (masked for TLM, unmasked for STM and CTC): the same loss and gradients."""
    model = make_model(pair_ctc=True, pair_ctc_units="tokens", attention_dropout=0.0,
                       activation_dropout=0.0).train()
    pair = make_sample()["pair"]
    criterion = make_criterion()

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(0)  # the quantizer's Gumbel noise
        loss = criterion(model, {"pair": pair})[0]
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    shared_loss, shared_gradients = loss_and_gradients()
    speech_encoder = model.encoder.speech_encoder
    inputs = (pair["features"].float(), pair["feature_lengths"])
    encode_subsampled = speech_encoder.encode_subsampled
    speech_encoder.encode_subsampled = (  # each pass subsamples the features again
        lambda subsampled, padding_mask, frame_mask=None, padded=None: encode_subsampled(
            *speech_encoder.subsample(*inputs), frame_mask, padded=padded))
    separate_loss, separate_gradients = loss_and_gradients()
    assert torch.allclose(shared_loss, separate_loss, rtol=1e-6)
    assert shared_gradients.keys() == separate_gradients.keys()
    assert shared_gradients["encoder.speech_encoder.subsampling.conv_first.weight"].abs().sum() > 0
    for name, gradient in shared_gradients.items():
        assert torch.allclose(gradient, separate_gradients[name], rtol=1e-4, atol=1e-7), name


# -- host syncs -----------------------------------------------------------------------------------
# Per update of speech + text + pairs (with pair CTC) of collated batches, each pass with some
# padding, counted on CPU:
#   scalar reads (8; one more per pass the host says has no padding, its check), free on a CPU: the speech length check of each subsampling pass (2: speech 1,
#     pair 1), the packed width of each [speech ; text] pass checked against its real rows (2), the
#     count of each host-side index against its mask (4: masked frames of speech and pair, targets
#     of text and pair); on an accelerator (``sync_free_paths``) asynchronous device asserts;
#   ctc_loss's lengths (1), which it copies to the host itself;
#   the non-finite-loss guard (1, once per update, after the last backward);
#   tensors made from host data (``torch.tensor``, ``new_tensor``: a host-to-device copy on an
#     accelerator, which waits for the queued kernels like a read): the logged Python numbers, in
#     one copy after the guard's read, when nothing is queued (1).
# The masked frames and target tokens come from the collaters (host-side indices, no nonzero), and
# so do each row's lengths (``lengths_on_host``: whether a stack pass has padding, how wide a pair
# packs; without them a CPU reads both, 8 + 2 more reads, and an accelerator always makes a mask and
# packs to the sum of the padded widths). The CTC targets are padded (no boolean index), counts are
# made on the device (``torch.full``) and the step's loss is summed there. The criterion reads
# nothing: its logged values stay tensors until reduce_metrics.
SYNC_BOUND = 11
SYNC_FREE_READS = {"_ctc_loss": 1, "tolist": 1, "host_data": 1}
HOST_KEYS = ("masked_frames", "target_index", "lengths_on_host")


def _our_update(pair_ctc: bool = True):
    args = bench_pretraining.parse_args(["--smoke"] + (["--pair-ctc"] if pair_ctc else []))
    with tempfile.TemporaryDirectory() as directory:
        update = bench_pretraining.OurUpdate(args, torch.device("cpu"), Path(directory))
    dictionary = update.task.source_dictionary
    sample = bench_pretraining.make_batches(3, 3, 3, 150, 10, 6, 0.3, len(dictionary) - 1, dictionary.nspecial,
                                            dictionary.pad(), dictionary.index("<mask>"))
    return update, sample


def _without(sample: dict, keys) -> dict:
    return {name: {key: value for key, value in batch.items() if key not in keys} for name, batch in sample.items()}


def test_a_train_step_reads_the_device_a_bounded_number_of_times_and_logging_once():
    update, sample = _our_update()
    update(sample)  # warm-up: lazy initialisation does not count
    update.optimizer.zero_grad()
    with SyncCounter() as counter:
        _, _, logging_output = update.task.train_step(sample, update.model, update.criterion, update.optimizer,
                                                      update_num=0)
    assert counter.total <= SYNC_BOUND, dict(counter.counts)
    assert counter.counts["_local_scalar_dense"] <= 8, dict(counter.counts)  # no per-objective item()
    assert counter.counts["nonzero"] == 0 and counter.counts["index[bool]"] == 0, dict(counter.counts)
    assert all(torch.is_tensor(logging_output[key]) for key in ("loss", "_stm_loss_sum", "_msm_mlm_count"))

    from fairseq import metrics
    with metrics.aggregate() as aggregated, SyncCounter() as counter:
        update.criterion.reduce_metrics([logging_output])
    assert counter.total == 1, dict(counter.counts)
    assert aggregated.get_smoothed_values()["stm_loss"] > 0


def _without_dropout(update) -> None:
    """Every dropout rate 0, so that two paths whose tensors differ in width draw the same noise."""
    for module in update.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, RotarySelfAttention):
            module.dropout = 0.0


def _updates_on_both_paths(update, sample):
    """(sync counts, logging output, gradients) of one train_step on the CPU paths (False) and on
    the accelerator paths (True), from the same random state."""
    results = {}
    for sync_free in (False, True):
        torch.manual_seed(5)
        update.optimizer.zero_grad()
        with (sync_free_paths() if sync_free else contextlib.nullcontext()), SyncCounter() as counter:
            _, _, logging_output = update.task.train_step(sample, update.model, update.criterion,
                                                          update.optimizer, update_num=0)
        gradients = {name: p.grad.clone() for name, p in update.model.named_parameters() if p.grad is not None}
        results[sync_free] = (dict(counter.counts), logging_output, gradients)
    return results


LOGGED_LOSSES = ("loss", "_msm_contrastive_loss_sum", "_msm_mlm_loss_sum", "_span_masking_loss_sum",
                 "_tlm_text_loss_sum", "_tlm_speech_loss_sum", "_stm_loss_sum", "_pair_ctc_loss_sum")


def test_with_lengths_on_host_the_accelerator_paths_give_the_cpu_update_bit_for_bit_with_three_reads():
    """The collaters' lengths give every pass the width and the mask the CPU reads from the device,
    so the same dropout noise falls on the same positions: the same update bit for bit."""
    update, sample = _our_update()
    update(sample)
    results = _updates_on_both_paths(update, sample)
    assert results[True][0] == SYNC_FREE_READS, results[True][0]
    assert sum(results[False][0].values()) > sum(SYNC_FREE_READS.values())
    for key in LOGGED_LOSSES:
        assert torch.equal(torch.as_tensor(results[True][1][key]), torch.as_tensor(results[False][1][key])), key
    assert results[True][2].keys() == results[False][2].keys()
    assert all(torch.equal(results[True][2][name], gradient) for name, gradient in results[False][2].items())


def test_without_lengths_on_host_the_accelerator_paths_read_as_little_and_give_the_same_update():
    """A hand-built batch: an accelerator then makes every mask and packs pairs to the sum of the
    padded widths (dropout off: the widths differ, so would the noise)."""
    update, sample = _our_update()
    sample = _without(sample, ("lengths_on_host",))
    _without_dropout(update)
    update(sample)
    results = _updates_on_both_paths(update, sample)
    assert results[True][0] == SYNC_FREE_READS, results[True][0]
    assert results[False][0]["_local_scalar_dense"] == 16, results[False][0]  # + padding (8), packed widths (2)
    for key in LOGGED_LOSSES:
        assert torch.allclose(torch.as_tensor(results[True][1][key]), torch.as_tensor(results[False][1][key]),
                              rtol=1e-5, atol=1e-6), key
    assert results[True][2].keys() == results[False][2].keys()
    for name, gradient in results[False][2].items():
        assert torch.allclose(results[True][2][name], gradient, rtol=1e-4, atol=1e-6), name


def _stack_calls(update, sample, sync_free: bool):
    """(width, padded) of every Conformer stack pass of one forward, in call order."""
    calls = []
    hooks = [stack.register_forward_pre_hook(lambda _, args, kwargs: calls.append(
                 (args[0].shape[1], kwargs.get("padded"))), with_kwargs=True)
             for stack in (update.model.encoder.speech_encoder.conformer,
                           update.model.encoder.multimodal_encoder.conformer)]
    try:
        with (sync_free_paths() if sync_free else contextlib.nullcontext()), torch.no_grad():
            update.model(**sample)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def test_on_the_accelerator_paths_lengths_on_host_give_tight_pair_widths_and_no_mask_without_padding():
    """Each Conformer stack pass of a sync-free update is as wide as on the CPU paths (a pair: its
    longest packed row, not the sum of the padded widths), and a pass over rows of equal length is
    told it has no padding (no attention mask: flash stays open on CUDA). STM packs each row's
    speech with the transcript it is matched with, here another row's, so its width differs."""
    update, sample = _our_update()
    pad = update.task.source_dictionary.pad()
    sample["text"] = _equal_length_text(sample["text"], pad)
    sample["pair"] = _longest_text_with_shortest_speech(sample["pair"], pad)
    seen = {sync_free: _stack_calls(update, sample, sync_free) for sync_free in (False, True)}
    assert seen[True] == seen[False]
    assert seen[True][2] == (sample["text"]["tokens"].shape[1], False)  # speech, speech alone, then text
    hosted = sample["pair"]["lengths_on_host"]
    padded_sum = sample["pair"]["frame_mask"].shape[1] + sample["pair"]["clean_tokens"].shape[1]
    tlm, stm = seen[True][-4], seen[True][-2]  # masked speech, TLM, unmasked speech, STM, CTC
    assert tlm == (max(s + t for s, t in zip(hosted["speech"], hosted["text"])), True) and tlm[0] < padded_sum
    assert stm == (max(s + t for s, t in zip(hosted["speech"], hosted["stm_text"])), True) and stm[0] != tlm[0]


def test_a_pair_batch_without_padding_runs_every_pass_without_a_mask():
    update, _ = _our_update()
    dictionary = update.task.source_dictionary
    sample = bench_pretraining.make_batches(1, 1, 1, 150, 10, 6, 0.3, len(dictionary) - 1, dictionary.nspecial,
                                            dictionary.pad(), dictionary.index("<mask>"))
    calls = _stack_calls(update, {"pair": sample["pair"]}, sync_free=True)
    assert len(calls) == 5 and all(padded is False for _, padded in calls), calls


def _equal_length_text(batch: dict, pad: int) -> dict:
    """The text batch cut to its shortest row (no padding left), with its host keys rebuilt."""
    shortest = min(batch["lengths_on_host"]["text"])
    tokens, target = batch["tokens"][:, :shortest], batch["target"][:, :shortest]
    return dict(batch, tokens=tokens, target=target, target_index=target_index(target, pad),
                lengths_on_host={"text": (shortest,) * tokens.shape[0]})


def _longest_text_with_shortest_speech(batch: dict, pad: int) -> dict:
    """The pair batch with its transcripts reordered by length, shortest first (its speech is
    longest first), STM matching them in reverse, and its host keys rebuilt."""
    order = torch.sort(batch["clean_tokens"].ne(pad).sum(1), stable=True).indices
    tokens, target, clean = (batch[key][order] for key in ("tokens", "target", "clean_tokens"))
    texts = tuple(int(n) for n in clean.ne(pad).sum(1))
    assert min(texts) < max(texts) and list(batch["lengths_on_host"]["speech"]) == sorted(
        batch["lengths_on_host"]["speech"], reverse=True)
    stm_text_index = torch.arange(len(texts)).flip(0)  # the longest speech with the longest text
    hosted = dict(batch["lengths_on_host"], text=texts, stm_text=tuple(texts[int(row)] for row in stm_text_index))
    return dict(batch, tokens=tokens, target=target, clean_tokens=clean, target_index=target_index(target, pad),
                stm_text_index=stm_text_index, stm_label=(stm_text_index == torch.arange(len(texts))).long(),
                lengths_on_host=hosted)


def test_a_batch_without_host_keys_gives_the_same_update_through_nonzero():
    update, sample = _our_update()
    bare = _without(sample, HOST_KEYS)
    assert any("masked_frames" in batch for batch in sample.values())
    results = []
    for batches in (sample, bare):
        torch.manual_seed(5)
        update.optimizer.zero_grad()
        with SyncCounter() as counter:
            loss, _, _ = update.task.train_step(batches, update.model, update.criterion, update.optimizer, update_num=0)
        results.append((loss.detach(), counter.counts["nonzero"],
                        [p.grad.clone() for p in update.model.parameters() if p.grad is not None]))
    assert results[0][1] == 0 and results[1][1] == 4  # masked frames of speech and pair, targets of text and pair
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2]))


def test_host_lengths_for_another_number_of_rows_are_refused_on_every_device():
    update, sample = _our_update()
    edited = dict(sample["text"], lengths_on_host={"text": sample["text"]["lengths_on_host"]["text"][:-1]})
    for paths in (contextlib.nullcontext, sync_free_paths):
        with paths(), pytest.raises(ValueError, match=r"\['text'\] holds 2 lengths for a batch of 3 rows"):
            update.model(text=edited)


def test_a_host_index_that_no_longer_matches_its_mask_is_refused_on_a_cpu():
    update, sample = _our_update()
    edited = dict(sample["text"], target=sample["text"]["target"].clone())
    edited["target"][0, :] = update.task.source_dictionary.pad()  # row 0 loses its targets
    with pytest.raises(ValueError, match="target_index"):
        update.model(text=edited)


# -- how padded the batches are (benchmarks/batch_padding.py) ---------------------------------------
def test_batch_padding_counts_packed_widths_both_ways_and_unpadded_batches():
    import numpy as np

    import batch_padding
    speech, text = np.array([10, 8, 6]), np.array([1, 3, 2])  # real: 30 positions
    batches = [np.array([0, 1, 2])]
    assert batch_padding.padding_share(batches, speech + text) == pytest.approx(1 - 30 / 33)  # 3 x 11
    assert batch_padding.padding_share_of_sums(batches, speech, text) == pytest.approx(1 - 30 / 39)  # 3 x (10 + 3)
    assert batch_padding.unpadded_batches([np.array([0]), np.array([0, 1]), np.array([1, 1])], speech) == 2


# -- torch.compile of each layer ------------------------------------------------------------------
def _compiled_matches_eager(backend: str) -> None:
    sample = make_sample()
    results = []
    from torch._dynamo.utils import counters

    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = make_model(compile_layers=compiled, compile_backend=backend).eval()
        loss, _, _ = make_criterion()(model, {"speech": sample["speech"]})
        loss.backward()
        if compiled:  # the layers ran as captured graphs, whole: no layer fell back to eager
            assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
            assert not counters["graph_break"], dict(counters["graph_break"])
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, sorted(model.state_dict())))
    assert results[0][2] == results[1][2]  # checkpoints keep their parameter names
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], rtol=1e-3, atol=1e-5), name


def test_compile_layers_traces_the_layers_and_matches_eager():
    """AOTAutograd tracing (forward and backward graphs of each layer), no code generation."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_compile_layers_with_inductor_matches_eager():
    _compiled_matches_eager("inductor")


def test_compile_layers_is_off_by_default():
    model = make_model()
    layer = model.encoder.speech_encoder.conformer.layers[0]
    assert getattr(layer, "_compiled_call_impl", None) is None
    assert make_model(compile_layers=True, compile_backend="eager").encoder.speech_encoder.conformer.layers[0] \
        ._compiled_call_impl is not None


# -- the benchmark ------------------------------------------------------------------------------
def test_benchmark_smoke_mode_ends_with_a_finite_ratio(capsys):
    ratio = bench_pretraining.main(["--smoke", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"ratio ours/stock: {ratio:.2f}"
    assert ratio > 0 and torch.isfinite(torch.tensor(ratio))
    sides = [line for line in lines if line.startswith(("ours", "stock"))]
    assert len(sides) == 2 and all("updates/s" in line and "nan" not in line for line in sides), sides
    memory = [line for line in lines if line.startswith("memory ")]
    assert len(memory) == 2 and all("saved activations" in line and "nan" not in line for line in memory), memory


@pytest.mark.parametrize("arch", ["slam_tiny", "slam_paper"])
def test_stock_side_drops_out_at_our_rate_in_each_role(arch):
    """Stock's Conformer layer takes one dropout rate for every role; the benchmark sets attention
    and FFN-activation dropout to ours, so neither side does more random draws than the other."""
    import argparse

    from fairseq.models import ARCH_CONFIG_REGISTRY

    from slam_fairseq.encoders.config import config_from
    from slam_fairseq.models.slam import SlamConfig

    namespace = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](namespace)
    sizes = config_from(namespace, SlamConfig)
    if arch == "slam_paper":  # build the layers at a small width: only the rates matter here
        sizes.encoder_embed_dim, sizes.encoder_ffn_embed_dim, sizes.subsampling_conv_channels = 16, 32, 4
    stock = bench_pretraining.build_stock_model(sizes, 50, 1, 8, pair_ctc=False)
    for layer in (*stock.speech_layers, *stock.joint_layers):
        assert layer.self_attn.dropout_module.p == sizes.attention_dropout
        assert layer.ffn1.dropout1.p == layer.ffn2.dropout1.p == sizes.activation_dropout
        assert layer.ffn1.dropout2.p == layer.self_attn_dropout.p == layer.conv_module.dropout.p == sizes.dropout
    for layer in stock.text_encoder.layers:
        assert layer.self_attn.dropout_module.p == sizes.attention_dropout
        assert layer.activation_dropout_module.p == sizes.activation_dropout
        assert layer.dropout_module.p == sizes.dropout


def test_saved_activations_are_counted_once_per_storage_per_backward_and_without_parameters():
    weight = torch.nn.Parameter(torch.randn(1 << 18))  # 1 MiB
    small, large = torch.randn(1 << 18, requires_grad=True), torch.randn(1 << 19, requires_grad=True)

    def step():
        (small * small * weight).sum().backward()  # small (1 MiB, saved twice), small * small (1 MiB)
        large.exp().sum().backward()  # exp's result (2 MiB): a second backward pass, on its own

    assert bench_pretraining.saved_activation_mib(step, [weight]) == pytest.approx(2.0)
    assert bench_pretraining.saved_activation_mib(lambda: (small * weight).sum().backward(), [weight]) \
        == pytest.approx(1.0)


def test_the_operator_count_leaves_out_views_and_counts_each_computing_call():
    x = torch.randn(4, 6, requires_grad=True)

    def step():
        y = x.view(6, 4).t().reshape(24)  # views only
        (y * 2 + 1).sum().backward()  # mul, add, sum, then their backward

    forward_only = bench_pretraining.count_compute_ops(lambda: (x.detach().view(24) * 2).sum())
    assert forward_only == 2  # mul, sum
    assert bench_pretraining.count_compute_ops(step) > bench_pretraining.count_compute_ops(
        lambda: (x.view(24) * 2 + 1).sum()) == 3


# -- host memory ----------------------------------------------------------------------------------
def test_a_cpu_train_step_gives_freed_heap_memory_back(monkeypatch):
    from slam_fairseq.host_memory import release_free_heap_memory
    from slam_fairseq.tasks import slam_pretraining

    if sys.platform.startswith("linux"):
        assert release_free_heap_memory()  # glibc has malloc_trim
    calls = []
    monkeypatch.setattr(slam_pretraining, "release_free_heap_memory", lambda: calls.append(1) or True)
    update, sample = _our_update(pair_ctc=False)
    update(sample)
    assert calls == []  # off by default: it costs page faults on every update
    update.task.cfg.release_host_memory = True
    update(sample)
    assert calls == [1]
