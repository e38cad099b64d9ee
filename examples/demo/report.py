"""The demo's report: scores per init and seed, loss curves as a PNG, timings; from fairseq's logs."""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Dict, List

_JSON_LOG = re.compile(r"\| (train_inner|valid) \| (\{.*\})\s*$")
PRETRAINING_LOSSES = ["span_masking_loss", "msm_contrastive_loss", "msm_mlm_loss", "diversity_loss",
                      "tlm_text_loss", "tlm_speech_loss", "stm_loss", "pair_ctc_loss"]


def read_train_log(log_path: Path) -> List[Dict[str, float]]:
    """The ``train_inner`` records of a fairseq log written with ``--log-format json``."""
    records = []
    for line in log_path.read_text(encoding="utf-8").splitlines():
        match = _JSON_LOG.search(line)
        if match and match.group(1) == "train_inner":
            record = json.loads(match.group(2))
            records.append({key: float(value) for key, value in record.items()
                            if isinstance(value, (int, float, str)) and _is_number(value)})
    return records


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def first_and_last(records: List[Dict[str, float]], key: str):
    values = [record[key] for record in records if key in record]
    return (values[0], values[-1]) if values else (None, None)


def plot_losses(pretrain_log: Path, finetune_logs: Dict[str, Path], stage2_start: int, output: Path) -> None:
    """Per-objective pre-training losses (stage switch marked) and fine-tuning losses, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_train_log(pretrain_log)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for key in PRETRAINING_LOSSES:
        points = [(record["num_updates"], record[key]) for record in records if key in record]
        if points:
            left.plot(*zip(*points), marker=".", label=key.replace("_loss", ""))
    left.axvline(stage2_start, color="grey", linestyle="--", label="stage 2 starts")
    left.set(title="pre-training: loss per objective", xlabel="update", ylabel="loss")
    left.legend(fontsize=8)
    for name, log in sorted(finetune_logs.items()):
        points = [(record["num_updates"], record["loss"]) for record in read_train_log(log) if "loss" in record]
        if points:
            right.plot(*zip(*points), marker=".", label=name, linestyle="-" if "pretrained" in name else ":")
    right.set(title="fine-tuning: training loss (label-smoothed CE)", xlabel="update", ylabel="loss")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def distinct_hypotheses(generate_output: str) -> Dict[str, int]:
    """How many different hypotheses fairseq-generate wrote (its ``D-`` lines) for how many
    utterances: a model whose encoder output collapsed says the same sentence for every input."""
    hypotheses = [line.split("\t", 2)[-1] for line in generate_output.splitlines() if line.startswith("D-")]
    return {"distinct": len(set(hypotheses)), "utterances": len(hypotheses)}


def summarize(scores: Dict[str, Dict[str, Dict[int, float]]]) -> Dict[str, Dict[str, object]]:
    """scores[kind][init][seed] -> per kind: mean per init and whether pre-training won every seed."""
    summary = {}
    for kind, by_init in scores.items():
        better = (lambda pre, scratch: pre > scratch) if kind == "st" else (lambda pre, scratch: pre < scratch)
        seeds = sorted(set(by_init.get("pretrained", {})) & set(by_init.get("scratch", {})))
        summary[kind] = {
            "metric": "BLEU" if kind == "st" else "WER",
            "pretrained_mean": statistics.mean(by_init["pretrained"][s] for s in seeds) if seeds else None,
            "scratch_mean": statistics.mean(by_init["scratch"][s] for s in seeds) if seeds else None,
            "pretrained_better_every_seed": bool(seeds) and all(
                better(by_init["pretrained"][s], by_init["scratch"][s]) for s in seeds),
        }
    return summary


def write_markdown(path: Path, scores, summary, pretraining_changes, timings, command: str,
                   distinct: Dict[str, Dict[str, Dict[int, Dict[str, int]]]] = None) -> str:
    lines = ["# SLAM demo report", "", f"Command: `{command}`", "",
             "## Held-out test sets (voices and sentences unseen in any training)", "",
             "| task | metric | init | " + " | ".join(f"seed {s}" for s in _seeds(scores)) + " | mean |",
             "| --- | --- | --- |" + " --- |" * (len(_seeds(scores)) + 1)]
    for kind in ("st", "asr"):
        if kind not in scores:
            continue
        metric = summary[kind]["metric"]
        for init in ("pretrained", "scratch"):
            values = [scores[kind][init].get(seed) for seed in _seeds(scores)]
            mean = summary[kind][f"{init}_mean"]
            lines.append(f"| {'ST es-en' if kind == 'st' else 'ASR en'} | {metric} | {init} | "
                         + " | ".join("-" if v is None else f"{v:.2f}" for v in values)
                         + f" | {'-' if mean is None else f'{mean:.2f}'} |")
    if distinct:
        lines += ["", "Distinct test hypotheses (the same sentence for every input means the encoder output "
                  "collapsed):", ""]
        for kind, by_init in distinct.items():
            for init, by_seed in by_init.items():
                counts = ", ".join(f"seed {seed}: {c['distinct']}/{c['utterances']}" for seed, c in sorted(by_seed.items()))
                lines.append(f"- {kind} {init}: {counts}")
    lines += ["", "Pre-training beats scratch at every seed: "
              + ", ".join(f"{kind.upper()} {'yes' if s['pretrained_better_every_seed'] else 'NO'}"
                          for kind, s in summary.items()), "",
              "## Pre-training objectives (first -> last logged training loss)", ""]
    for key, (first, last) in pretraining_changes.items():
        if first is not None:
            lines.append(f"- {key}: {first:.3f} -> {last:.3f}")
    lines += ["", "Loss curves: `losses.png`.", "", "## Timings (seconds)", ""]
    lines += [f"- {name}: {seconds}" for name, seconds in timings.items()]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def _seeds(scores) -> List[int]:
    return sorted({seed for by_init in scores.values() for by_seed in by_init.values() for seed in by_seed})
