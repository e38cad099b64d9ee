"""One update = one batch of every modality: the round-robin zip behind ``slam_pretraining``.

Each modality is batched on its own (``make_modality_batches``: sorted by size, fairseq's
``data_utils.batch_by_size`` with that modality's limits, never rounded to a batch-size multiple,
so the last batch is kept). :class:`RoundRobinBatchDataset` then zips them: its item ``(epoch,
step)`` is the list of examples of step ``step`` for every modality, and its collater returns
``{"speech": ..., "text": ..., "pair": ...}`` (``docs/pretraining_batches.md``).

- Training (``cycle=True``): an epoch is one pass over the *epoch modality* (by default the one
  with the most batches); every other modality is cycled: its batches are visited in a fresh
  random order each cycle, and the cycles continue across epochs (step ``s`` of epoch ``e`` is
  position ``(e - 1) * steps + s`` of every modality's endless cycle), so every batch of a small
  modality is seen equally often.
- Validation (``cycle=False``): every batch of every modality once; steps past a modality's last
  batch leave that modality out. The masks are those of epoch 1 at every validation (fairseq
  reuses one validation iterator and counts its epochs up), so validation losses are comparable.

Modalities no update of an epoch trains (pairs, active from stage 2 on, in an epoch that ends
before stage 2 starts) are left out of its keys, ``(epoch, step, left_out)``, and never read: the
task decides at the start of each epoch (:attr:`RoundRobinBatchDataset.modalities_left_out`);
which batch a modality has at a step does not change.

The batch list handed to fairseq's :class:`EpochBatchIterator` is ``[[(epoch, step)], ...]``,
rebuilt every epoch (a callable batch sampler). fairseq shuffles it, shards it over GPUs and
checkpoints the position in it as usual, so ``--restore-file`` resumes mid-epoch. Because the
epoch travels in the key, masks and cycle positions never depend on state held by data-loader
workers (which fairseq keeps alive across epochs).
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from fairseq.data import FairseqDataset, data_utils, iterators
from fairseq.logging import metrics

from slam_fairseq.compat.fairseq_internals import reset_cached_batches
from slam_fairseq.data.pretraining.modality import MODALITIES, PretrainingModalityDataset
from slam_fairseq.data.pretraining.row_checks import BAD_ROWS_KEY, BadRowError
from slam_fairseq.data.pretraining.seeding import BATCH_CYCLE_ORDER, masking_rng

logger = logging.getLogger(__name__)

__all__ = ["MODALITIES", "make_modality_batches", "RoundRobinBatchDataset",
           "RoundRobinEpochBatchIterator", "LEFT_OUT_KEY"]

#: (epoch, step), or (epoch, step, modalities left out)
StepKey = Tuple
#: most cycle orders a modality keeps (:meth:`RoundRobinBatchDataset._cycle_order`)
CACHED_CYCLES = 1024
#: collated batch key: the modalities the step's key left out (so the task can check its stage)
LEFT_OUT_KEY = "left_out_modalities"


def _key_parts(key: StepKey) -> Tuple[int, int, Tuple[str, ...]]:
    """(epoch, step, modalities left out) of a step's key."""
    return int(key[0]), int(key[1]), tuple(key[2]) if len(key) > 2 else ()


def make_modality_batches(dataset: PretrainingModalityDataset, max_tokens: Optional[int],
                          max_sentences: Optional[int], max_positions: Tuple[int, int],
                          seed: int, allow_empty: bool = False) -> List[np.ndarray]:
    """Batches of one modality, by size; too long examples are skipped with a counted warning.

    Args:
        dataset: a speech, text or pair dataset.
        max_tokens: size limit of a padded batch (frames for speech and pairs, tokens for text).
        max_sentences: examples per batch.
        max_positions: (speech frames, text tokens) an example may have.
        seed: orders ties among equal sizes.
        allow_empty: return no batches, with a warning, when every example is skipped (a
            validation split goes on with its other modalities); else that is an error.
    Returns:
        a list of (B_i,) int64 index arrays.
    """
    with data_utils.numpy_seed(seed):
        indices = dataset.ordered_indices()
    too_long = dataset.max_size_exceeded(max_positions)[indices]
    if too_long.any():
        logger.warning(f"{dataset.name}: skipped {int(too_long.sum())} of {len(indices)} {dataset.modality} "
                       f"examples longer than max positions ({max_positions[0]} speech frames "
                       f"(--max-source-positions), {max_positions[1]} text tokens (--max-text-positions))")
        indices = indices[~too_long]
    if max_tokens is not None:
        too_big = dataset.sizes[indices] > max_tokens
        if too_big.any():
            logger.warning(f"{dataset.name}: skipped {int(too_big.sum())} {dataset.modality} examples "
                           f"larger than a whole batch ({max_tokens} max tokens)")
            indices = indices[~too_big]
    if len(indices) == 0 and allow_empty:
        logger.warning(f"{dataset.name}: every {dataset.modality} example was skipped (see the warnings above): "
                       f"this split is evaluated without {dataset.modality} batches")
        return []
    if len(indices) == 0:
        raise ValueError(f"{dataset.name}: every {dataset.modality} example was skipped "
                         "(see the warnings above): raise the length or batch limits")
    return data_utils.batch_by_size(indices, dataset.num_tokens, num_tokens_vec=dataset.sizes[indices],
                                    max_tokens=max_tokens, max_sentences=max_sentences,
                                    required_batch_size_multiple=1)


class RoundRobinBatchDataset(FairseqDataset):
    """Zip of per-modality batches; one item per update (see the module docstring).

    Args:
        datasets: modality name -> dataset, in :data:`MODALITIES` order.
        seed: the run's seed (cycle orders).
        cycle: cycle the smaller modalities (training) or visit every batch once (validation).
        epoch_modality: ``largest`` or a modality name: the modality one epoch passes over once.
    """

    def __init__(self, datasets: Dict[str, PretrainingModalityDataset], seed: int, cycle: bool = True,
                 epoch_modality: str = "largest") -> None:
        super().__init__()
        if not datasets:
            raise ValueError("no pre-training data to zip")
        unknown = set(datasets) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; expected some of {MODALITIES}")
        self.datasets = OrderedDict((name, datasets[name]) for name in MODALITIES if name in datasets)
        if epoch_modality != "largest" and epoch_modality not in self.datasets:
            raise ValueError(f"epoch modality {epoch_modality!r} has no data here (have {list(self.datasets)})")
        self.seed = int(seed)
        self.cycle = cycle
        self.epoch_modality_choice = epoch_modality
        self.batches: Dict[str, List[np.ndarray]] = {}
        self.epoch_modality = ""
        self.num_steps = 0
        self.batch_counts: Dict[str, int] = {}
        self.batch_digest = ""  # of every modality's batches: which examples, in which batch
        self.batch_digests: Dict[str, str] = {}  # the same, of each modality's own
        self._cycle_orders: Dict[str, "OrderedDict[int, np.ndarray]"] = {}
        #: set by the task for training: (steps per epoch) -> modalities none of the epoch's
        #: updates trains, asked once per epoch when its batch list is made
        self.modalities_left_out: Optional[Callable[[int], Sequence[str]]] = None

    def __getstate__(self) -> Dict[str, Any]:
        """What a data-loader worker started by pickling (``spawn``) gets: not the task's
        :attr:`modalities_left_out` (only the batch sampler, in the training process, asks it)."""
        state = dict(self.__dict__)
        state["modalities_left_out"] = None
        return state

    # -- planning ------------------------------------------------------------------------------
    def set_batches(self, batches: Dict[str, Sequence[np.ndarray]]) -> None:
        """Install each modality's batches (from :func:`make_modality_batches`)."""
        if set(batches) != set(self.datasets):
            raise ValueError(f"batches for {sorted(batches)}, datasets for {sorted(self.datasets)}")
        self.batches = {name: [np.asarray(b, dtype=np.int64) for b in batches[name]] for name in self.datasets}
        if self.epoch_modality_choice == "largest":
            self.epoch_modality = max(self.datasets, key=lambda name: len(self.batches[name]))
        else:
            self.epoch_modality = self.epoch_modality_choice
        counts = {name: len(self.batches[name]) for name in self.datasets}
        self.num_steps = max(counts.values()) if not self.cycle else counts[self.epoch_modality]
        self.batch_counts = counts
        digest = hashlib.sha1()
        self.batch_digests = {}
        for name in self.datasets:
            digest.update(name.encode())
            own = hashlib.sha1()
            for batch in self.batches[name]:
                for stream in (digest, own):
                    stream.update(len(batch).to_bytes(8, "little"))
                    stream.update(batch.tobytes())
            self.batch_digests[name] = own.hexdigest()[:12]
        self.batch_digest = digest.hexdigest()[:12]
        self._cycle_orders = {}
        logger.info(f"round robin over {counts} batches: {self.num_steps} steps per epoch"
                    + (f" (one pass over {self.epoch_modality}, the others cycled)" if self.cycle else ""))

    def _cycle_order(self, name: str, cycle: int) -> np.ndarray:
        """The order of ``name``'s batches in its ``cycle``-th cycle. fairseq shuffles an epoch's
        steps, so the steps of one epoch ask for the cycles it spans in any order: each modality
        keeps the orders of that many cycles (plus two, at most :data:`CACHED_CYCLES`: a modality
        of many cycles an epoch has short orders, quick to draw again), least recently used out."""
        orders = self._cycle_orders.setdefault(name, OrderedDict())
        order = orders.get(cycle)
        if order is None:
            rng = masking_rng(self.seed, 1, cycle, BATCH_CYCLE_ORDER, extra=[MODALITIES.index(name)])
            count = len(self.batches[name])
            order = orders[cycle] = rng.permutation(count)
            if len(orders) > min(-(-self.num_steps // count) + 2, CACHED_CYCLES):
                orders.popitem(last=False)
        else:
            orders.move_to_end(cycle)
        return order

    def step_indices(self, epoch: int, step: int) -> Dict[str, np.ndarray]:
        """Example indices of every modality at ``step`` of ``epoch`` (1-based epoch)."""
        chosen = {}
        for name in self.datasets:
            count = len(self.batches[name])
            if not self.cycle:
                if step < count:
                    chosen[name] = self.batches[name][step]
                continue
            position = (epoch - 1) * self.num_steps + step
            order = self._cycle_order(name, position // count)
            chosen[name] = self.batches[name][order[position % count]]
        return chosen

    def batch_sampler(self, dataset, epoch: int) -> List[List[StepKey]]:
        """fairseq's callable batch sampler: one single-key "batch" per step of ``epoch``."""
        if not self.num_steps:
            raise RuntimeError("RoundRobinBatchDataset.set_batches was not called")
        epoch = int(epoch) if self.cycle else 1  # validation: the same masks at every validation
        unused = self.modalities_left_out(self.num_steps) if self.modalities_left_out is not None else ()
        left_out = tuple(name for name in self.datasets if name in unused)
        if left_out:
            logger.info(f"epoch {epoch}: no update of it trains {' or '.join(left_out)}: those batches are not read")
            return [[(epoch, step, left_out)] for step in range(self.num_steps)]
        return [[(epoch, step)] for step in range(self.num_steps)]

    # -- FairseqDataset ------------------------------------------------------------------------
    def __getitem__(self, key: StepKey) -> Dict[str, List[Any]]:
        """Items of every modality at this step; examples that raise :class:`BadRowError` are
        left out and listed under ``BAD_ROWS_KEY`` as (manifest, row id, message); the
        modalities the key leaves out are not read, and listed under ``LEFT_OUT_KEY``."""
        epoch, step, left_out = _key_parts(key)
        items: Dict[str, List[Any]] = {}
        bad_rows = []
        for name, indices in self.step_indices(epoch, step).items():
            if name in left_out:
                continue
            items[name] = []
            for index in indices:
                try:
                    items[name].append(self.datasets[name].get_item(int(index), epoch))
                except BadRowError as error:
                    bad_rows.append((str(error.source or self.datasets[name].name),
                                     str(error.row if error.row is not None else f"{name} {index}"), str(error)))
        items[BAD_ROWS_KEY] = bad_rows
        if left_out:
            items[LEFT_OUT_KEY] = left_out
        return items

    def __len__(self) -> int:
        return self.num_steps

    def collater(self, samples: List[Dict[str, List[Dict[str, Any]]]]) -> Dict[str, Any]:
        if not samples:
            return {}  # an empty shard slot: fairseq turns it into a dummy batch
        if len(samples) != 1:
            raise ValueError(f"a round-robin batch is one step, got {len(samples)}")
        items = dict(samples[0])
        bad_rows = items.pop(BAD_ROWS_KEY, [])
        left_out = items.pop(LEFT_OUT_KEY, ())
        batch = {name: self.datasets[name].collater(examples) for name, examples in items.items() if examples}
        if bad_rows:
            batch[BAD_ROWS_KEY] = bad_rows
        if left_out:
            batch[LEFT_OUT_KEY] = left_out
        return batch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for dataset in self.datasets.values():
            dataset.set_epoch(epoch)

    @property
    def can_reuse_epoch_itr_across_epochs(self) -> bool:
        return True

    def num_tokens(self, key: StepKey) -> int:
        epoch, step, left_out = _key_parts(key)
        return int(sum(self.datasets[name].sizes[indices].sum()
                       for name, indices in self.step_indices(epoch, step).items() if name not in left_out))

    def size(self, key: StepKey) -> int:
        return self.num_tokens(key)


class RoundRobinEpochBatchIterator(iterators.EpochBatchIterator):
    """fairseq's ``EpochBatchIterator`` over a :class:`RoundRobinBatchDataset`.

    Three changes:

    - loading a state of another epoch drops the cached batch list, so the keys carry the
      restored epoch (fairseq refreshes it on ``next_epoch_itr`` only);
    - the state also records the epoch's layout (:data:`LAYOUT_KEY`: steps per epoch, the epoch
      modality, the number of shards, each modality's batch count and a digest of which examples
      each batch holds), which the options decide (``--max-tokens-*``,
      ``--max-sentences-*``, ``--epoch-modality``, ``--stage2-start-update``, the data, the number
      of GPUs). fairseq resumes an epoch at its saved position in the batch list; under another
      layout that position points elsewhere, so some batches of the epoch would be skipped and
      others seen twice. A resumed position under another layout is a WARNING naming what
      changed; a position past the end of the new epoch starts the next epoch (fairseq would
      raise "Cannot resume training due to dataloader mismatch") with fresh epoch meters (the
      restored ones hold the old epoch's updates). ``--reset-dataloader``
      starts the epoch over instead;
    - the state carries :attr:`run_state` (:data:`RUN_STATE_KEY`), what the task keeps about the
      run itself (the stage its validation scores come from, the furthest stage trained).
    """

    LAYOUT_KEY = "slam_epoch_layout"
    RUN_STATE_KEY = "slam_run_state"

    #: what the task keeps about the run across a resume (saved with the iterator's state, which
    #: fairseq restores unless ``--reset-dataloader``): set by the task, shared with it
    run_state: Optional[Dict[str, Any]] = None

    @property
    def first_batch(self):
        """The epoch's first step with every modality (fairseq's dummy batch, which a rank runs in
        place of a missing one: it must hold what the other ranks' batches hold at any stage)."""
        if len(self.frozen_batches) == 0:
            raise RuntimeError("no batches: the epoch is empty")
        epoch, step, _ = _key_parts(self.frozen_batches[0][0])
        return self.collate_fn([self.dataset[(epoch, step)]])

    def layout(self) -> Dict[str, Any]:
        return {"steps_per_epoch": int(self.dataset.num_steps), "epoch_modality": str(self.dataset.epoch_modality),
                "num_shards": int(self.num_shards), "batches": dict(self.dataset.batch_counts),
                "batch_digest": str(self.dataset.batch_digest),
                "batch_digests": dict(self.dataset.batch_digests)}

    @staticmethod
    def layout_changes(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
        """What differs between a saved epoch layout and this run's in a way that moves a resumed
        position: the steps per epoch, the epoch modality, the shard count, or the batches of a
        modality both runs have. A modality only one of them has (pairs joining at stage 2, or
        left out) does not: each modality's batch at a step depends on its own batches and the
        steps per epoch alone (:meth:`RoundRobinBatchDataset.step_indices`). A layout saved
        without per-modality digests is compared whole."""
        if "batch_digests" in saved:
            shared = [name for name in current["batch_digests"] if name in saved["batch_digests"]]
            saved = dict(saved, batches={name: saved["batches"].get(name) for name in shared},
                         batch_digest={name: saved["batch_digests"][name] for name in shared})
            current = dict(current, batches={name: current["batches"][name] for name in shared},
                           batch_digest={name: current["batch_digests"][name] for name in shared})
        return [f"{key} {saved.get(key)} -> {value}" for key, value in current.items()
                if key != "batch_digests" and saved.get(key) != value]

    def state_dict(self):
        state = super().state_dict()
        state[self.LAYOUT_KEY] = self.layout()
        if self.run_state:
            state[self.RUN_STATE_KEY] = dict(self.run_state)
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        run_state = state_dict.pop(self.RUN_STATE_KEY, None)
        if run_state and self.run_state is not None:
            self.run_state.update(run_state)
        saved, position = state_dict.pop(self.LAYOUT_KEY, None), int(state_dict.get("iterations_in_epoch", 0))
        changes = self.layout_changes(saved, self.layout()) if saved is not None else []
        if position > 0 and changes:
            changed = ", ".join(changes)
            steps = len(self)
            if position >= steps:
                logger.warning(f"resuming epoch {state_dict['epoch']} at step {position}, but under the options of "
                               f"this run its epoch has only {steps} steps per shard ({changed}): starting "
                               f"epoch {state_dict['epoch'] + 1}")
                state_dict.update(epoch=int(state_dict["epoch"]) + 1, iterations_in_epoch=0)
                metrics.reset_meters("train")  # restored with the checkpoint: they hold the old epoch's part
            else:
                logger.warning(f"resuming epoch {state_dict['epoch']} at step {position} of a batch list laid out "
                               f"differently ({changed}: --max-tokens-*/--max-sentences-*, --epoch-modality, "
                               f"--stage2-start-update, the data or the number of GPUs changed): the rest of this "
                               f"epoch skips some batches and repeats others; --reset-dataloader starts the "
                               f"epoch over instead")
        if state_dict.get("epoch", self.epoch) != self.epoch:
            reset_cached_batches(self)
        return super().load_state_dict(state_dict)
