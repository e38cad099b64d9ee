"""The main job end to end, shortened (``--size ci``): every stage runs as a user runs it and the
report holds real scores. The full demo (``--size demo``, about 24 minutes) is marked slow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from s2t_fixtures import hypotheses, recomputed_bleu, recomputed_wer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _run_demo(work: Path, size: str, timeout: int) -> dict:
    result = subprocess.run([sys.executable, "examples/demo/run_demo.py", "--work", str(work), "--size", size],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "stage 2 starts" in result.stdout  # progress is shown, the stage switch included
    return json.loads((work / "report.json").read_text())


def _check_report(work: Path, report: dict, seeds) -> None:
    for kind in ("st", "asr"):
        for init in ("pretrained", "scratch"):
            scores = report["scores"][kind][init]
            assert sorted(int(seed) for seed in scores) == sorted(seeds)
            for seed, value in scores.items():
                assert 0.0 <= value <= 100.0 if kind == "st" else 0.0 <= value < float("inf")
                # the report's score is fairseq's, computed on every test sentence it generated
                generated = hypotheses((work / "generate" / f"{kind}_{init}_seed{seed}.txt").read_text())
                recomputed = recomputed_bleu(generated) if kind == "st" else recomputed_wer(generated)
                assert value == pytest.approx(recomputed, abs=0.01), (kind, init, seed)
    assert (work / "losses.png").stat().st_size > 10_000
    markdown = (work / "report.md").read_text()
    assert "BLEU" in markdown and "WER" in markdown and "pre-trained" not in markdown.split("|")[0]
    for name in ("pretrain", "finetune_st_pretrained_seed1", "decode_asr_scratch_seed1"):
        assert name in report["timings"]


@pytest.mark.timeout(1900)  # two runs of up to 900 s each: their own limits report a hang first
def test_short_demo_runs_every_stage_and_reports(tmp_path):
    work = tmp_path / "demo"
    report = _run_demo(work, "ci", timeout=900)
    _check_report(work, report, [1])
    # the generated hypotheses are of the held-out test set, every sentence scored
    generated = (work / "generate" / "st_pretrained_seed1.txt").read_text()
    test_rows = (work / "data" / "st" / "test_st_es_en.tsv").read_text().strip().splitlines()[1:]
    assert sum(line.startswith("H-") for line in generated.splitlines()) == len(test_rows)
    hypotheses = {line.split("\t")[-1] for line in generated.splitlines() if line.startswith("D-")}
    assert report["distinct_hypotheses"]["st"]["pretrained"]["1"] == {"distinct": len(hypotheses),
                                                                       "utterances": len(test_rows)}
    # a second run resumes: finished stages are not redone, and the report keeps their timings
    again = subprocess.run([sys.executable, "examples/demo/run_demo.py", "--work", str(work), "--size", "ci"],
                           cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "exists: skipping" in again.stdout
    resumed = json.loads((work / "report.json").read_text())
    assert resumed["timings"]["pretrain"] == report["timings"]["pretrain"]
    assert resumed["scores"] == report["scores"]


@pytest.mark.slow
@pytest.mark.timeout(4000)
def test_full_demo_pretraining_beats_scratch(tmp_path):
    work = tmp_path / "demo"
    report = _run_demo(work, "demo", timeout=3600)
    _check_report(work, report, [1, 2])
    assert report["summary"]["asr"]["pretrained_better_every_seed"]
    # ST at this budget moves by 2+ BLEU with the fine-tuning masks (README: pre-training wins 3
    # of 4 seeds, 0.11 BLEU behind at seed 2); what holds at every seed is that the scratch model
    # collapses to a few hypotheses and the pre-trained one does not
    distinct = report["distinct_hypotheses"]["st"]
    for seed in ("1", "2"):
        assert distinct["pretrained"][seed]["distinct"] > 4 * distinct["scratch"][seed]["distinct"], distinct
