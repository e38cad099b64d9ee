"""How much of each pre-training batch is padding, as ``slam_pretraining`` batches a data directory.

Builds the task's datasets and the batches ``get_batch_iterator`` would make (per-modality
``--max-tokens``; fairseq's ``batch_by_size`` over indices sorted by length) and prints, per
modality, the share of padded positions: feature frames for speech and pairs (what the Conv2d
subsampling and the speech layers see, after 4x subsampling the same share), tokens for text, and
for pairs the packed [subsampled speech ; text] sequence of TLM (STM's, which pairs a row's
speech with another row's transcript for about half the rows, is close to it), packed to its longest row
(what every device packs to with the collaters' ``lengths_on_host``) and to the sum of the padded
speech and text widths (what an accelerator packs to without them, not to read the longest row
from the device); and how many batches have no padding at all (they run attention without a mask).

    python benchmarks/batch_padding.py DATA --max-tokens 12000 --max-tokens-text 6000
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import numpy as np


def padding_share(batches: List[np.ndarray], sizes: np.ndarray) -> float:
    """Padded positions / all positions over the batches (each padded to its longest row)."""
    padded = sum(int(sizes[batch].max()) * len(batch) for batch in batches)
    return 1.0 - sum(int(sizes[batch].sum()) for batch in batches) / max(1, padded)


def padding_share_of_sums(batches: List[np.ndarray], first: np.ndarray, second: np.ndarray) -> float:
    """Padded positions / all positions when each batch of [first ; second] rows is as wide as
    the longest ``first`` plus the longest ``second``."""
    padded = sum((int(first[batch].max()) + int(second[batch].max())) * len(batch) for batch in batches)
    return 1.0 - sum(int(first[batch].sum() + second[batch].sum()) for batch in batches) / max(1, padded)


def unpadded_batches(batches: List[np.ndarray], sizes: np.ndarray) -> int:
    """Batches whose rows all have the same size."""
    return sum(int(sizes[batch].min() == sizes[batch].max()) for batch in batches)


def report(data: str, max_tokens: int, max_tokens_text: Optional[int], split: str = "train") -> Dict[str, float]:
    import torch

    import slam_fairseq  # noqa: F401
    from slam_fairseq.data.pretraining.round_robin import make_modality_batches
    from slam_fairseq.modules.subsampling import subsampled_lengths
    from slam_fairseq.tasks.slam_pretraining import SlamPretrainingConfig, SlamPretrainingTask

    cfg = SlamPretrainingConfig(data=data, stage2_start_update=0, seed=1, max_update=0, train_subset=split)
    task = SlamPretrainingTask.setup_task(cfg)
    task.load_dataset(split)
    shares: Dict[str, float] = {}
    for name, dataset in task.datasets[split].datasets.items():
        limit = max_tokens_text if name == "text" and max_tokens_text else max_tokens
        batches = make_modality_batches(dataset, limit, None, task.position_limits(), seed=1)
        shares[f"{name}_batches"] = len(batches)
        shares[f"{name}_rows_per_batch"] = float(np.mean([len(batch) for batch in batches]))
        shares[name] = padding_share(batches, dataset.sizes)
        stack_sizes = dataset.sizes if name == "text" else subsampled_lengths(torch.as_tensor(dataset.sizes)).numpy()
        shares[f"{name}_unpadded"] = unpadded_batches(batches, stack_sizes)
        if name == "pair":
            shares["pair_packed"] = padding_share(batches, stack_sizes + dataset.text_sizes)
            shares["pair_packed_unpadded"] = unpadded_batches(batches, stack_sizes + dataset.text_sizes)
            shares["pair_packed_sum"] = padding_share_of_sums(batches, stack_sizes, dataset.text_sizes)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("--max-tokens", type=int, default=12000)
    parser.add_argument("--max-tokens-text", type=int, default=None)
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    shares = report(args.data, args.max_tokens, args.max_tokens_text, args.split)
    for name in ("speech", "text", "pair", "pair_packed", "pair_packed_sum"):
        if name in shares:
            base = name.split("_")[0]
            unpadded = shares.get(f"{name}_unpadded")
            print(f"{name:15s} padding {100 * shares[name]:5.1f}%  ({shares[f'{base}_batches']} batches, "
                  f"{shares[f'{base}_rows_per_batch']:.1f} rows each"
                  + (f", {unpadded} without padding)" if unpadded is not None else ")"))


if __name__ == "__main__":
    main()
