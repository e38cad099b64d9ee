#!/usr/bin/env python3
"""Average the parameters of several fairseq checkpoints (fairseq's ``scripts/average_checkpoints.py``).

The fairseq 0.12 wheel ships neither ``scripts/`` nor an importable averaging function, so this is a
re-implementation with the same command line and the same result: the element-wise mean of every
tensor of ``model`` (integer tensors: floor division), the rest of the state (cfg, optimizer history)
from the first input. Checkpoints are read with PyTorch's weights-only loader; importing
``slam_fairseq`` first allow-lists the types fairseq checkpoints hold.

    python examples/average_checkpoints.py --inputs CKPT_DIR --num-epoch-checkpoints 10 \\
        --output CKPT_DIR/avg_last_10_checkpoint.pt
    python examples/average_checkpoints.py --inputs CKPT_DIR --num-update-checkpoints 5 --output avg.pt
    python examples/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import slam_fairseq.compat  # noqa: E402,F401  (weights-only allow-list for fairseq checkpoints)


def last_n_checkpoints(paths: Sequence[str], n: int, update_based: bool,
                       upper_bound: Optional[int] = None) -> List[str]:
    """The newest ``n`` of ``checkpoint<epoch>.pt`` (or ``checkpoint_<epoch>_<update>.pt``) in one
    directory, newest first; ``upper_bound`` excludes later epochs/updates."""
    if len(paths) != 1:
        raise SystemExit("--num-*-checkpoints takes one directory as --inputs")
    directory = paths[0]
    pattern = re.compile(r"checkpoint_\d+_(\d+)\.pt" if update_based else r"checkpoint(\d+)\.pt")
    found = []
    for name in os.listdir(directory):
        match = pattern.fullmatch(name)
        if match:
            number = int(match.group(1))
            if upper_bound is None or number <= upper_bound:
                found.append((number, name))
    if len(found) < n:
        raise SystemExit(f"found {len(found)} checkpoints in {directory}, fewer than the {n} requested")
    return [os.path.join(directory, name) for _, name in sorted(found, reverse=True)[:n]]


def average_checkpoints(inputs: Sequence[str]) -> Dict:
    """The first input's checkpoint with ``model`` replaced by the mean over all inputs.

    Raises:
        KeyError: the checkpoints hold different parameter names.
        ValueError: they were trained with different dictionaries (``*dictionary_fingerprint``).
    """
    summed: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    first_state = None
    keys = None
    for path in inputs:
        with open(path, "rb") as handle:
            state = torch.load(handle, map_location="cpu")
        if first_state is None:
            first_state = state
        model = state["model"]
        if keys is None:
            keys = list(model.keys())
        elif list(model.keys()) != keys:
            raise KeyError(f"{path} holds other parameters than {inputs[0]}")
        for key in keys:
            value = model[key]
            # fp16 and bf16 weights are summed in float32 (bf16 has an 8-bit mantissa)
            value = value.float() if value.is_floating_point() and value.element_size() < 4 else value
            if key.endswith("dictionary_fingerprint") and key in summed and not torch.equal(
                    value, first_state["model"][key]):
                raise ValueError(f"{path} was trained with another dictionary than {inputs[0]} ({key} "
                                 f"differs): their average would mean nothing")
            if key in summed:
                summed[key] += value
            else:
                summed[key] = value.clone()
    count = len(inputs)
    averaged = collections.OrderedDict()
    for key, value in summed.items():
        if value.is_floating_point():
            averaged[key] = value.div_(count)
        else:
            averaged[key] = torch.div(value, count, rounding_mode="floor")
    first_state["model"] = averaged
    return first_state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", required=True, nargs="+", help="checkpoint files, or one directory")
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpoint<epoch>.pt")
    count.add_argument("--num-update-checkpoints", type=int,
                       help="average the last N checkpoint_<epoch>_<update>.pt")
    parser.add_argument("--checkpoint-upper-bound", type=int,
                        help="with --num-*-checkpoints: ignore checkpoints after this epoch / update")
    args = parser.parse_args(argv)
    inputs = args.inputs
    if args.num_epoch_checkpoints is not None:
        inputs = last_n_checkpoints(inputs, args.num_epoch_checkpoints, False, args.checkpoint_upper_bound)
    elif args.num_update_checkpoints is not None:
        inputs = last_n_checkpoints(inputs, args.num_update_checkpoints, True, args.checkpoint_upper_bound)
    print("averaging checkpoints:", *inputs, sep="\n  ")
    state = average_checkpoints(inputs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".tmp-{output.name}")
    torch.save(state, str(temporary))
    os.replace(temporary, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
