"""Two CPU ranks over gloo, as real ``fairseq-train`` processes (one per rank, fairseq's own
``--distributed-no-spawn --distributed-rank R`` flags; ``distributed_helpers``).

- pre-training with validation whose modalities have unequal batch counts (ranks' validation
  steps hold different modalities, and one rank gets fairseq's dummy batch), an odd number of
  training steps (dummy batches in training too), the stage switch, a checkpoint and a resume;
  the parameters are hashed after every update on both ranks and must agree;
- fine-tuning ``slam_s2t_tiny`` from a pre-trained encoder, frozen for the first updates;
- 2 ranks with batch B each, started as users start them (``torchrun --nproc_per_node 2 -m
  slam_fairseq.launch``), make the same updates as 1 rank with ``--update-freq 2``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_helpers as dist  # noqa: E402
import pretraining_fixtures  # noqa: E402

import slam_fairseq  # noqa: E402,F401  (allow-lists fairseq's checkpoint types for torch.load)

NO_DROPOUT = ("--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Random features. Train: 10 speech (5 steps of 2: odd, so one rank gets a dummy batch at
    the end of each epoch), 12 text, 6 pairs. Valid: 5 speech (3 steps of 2, 2, 1), 6 text (1
    batch), 3 pairs (1 batch): the ranks' validation steps hold different modalities."""
    return pretraining_fixtures.build_data_dir(tmp_path_factory.mktemp("distributed") / "data",
                                               real_speech=False, num_speech=10)


def pretraining_args(data_dir: Path, save_dir: Path, max_update: int, *extra) -> list:
    return [str(data_dir), "--user-dir", dist.USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3",
            "--batch-size", "8", "--max-sentences-speech", "2", "--max-sentences-text", "6",
            "--max-sentences-pair", "3", "--max-update", str(max_update), "--save-dir", str(save_dir),
            "--no-epoch-checkpoints", "--seed", "7", "--log-format", "json", "--log-interval", "1",
            "--num-workers", "0", *extra]


def _records(output: str, kind: str):
    return dist.json_records(output, kind)


def _assert_same_parameters_on_every_rank(hash_dir: Path, world_size: int, updates: list) -> None:
    hashes = dist.read_hashes(hash_dir)
    assert sorted(hashes) == list(range(world_size)), f"hash files of ranks {sorted(hashes)}"
    assert [update for update, _ in hashes[0]] == updates
    for rank in range(1, world_size):
        assert hashes[rank] == hashes[0], f"rank {rank}'s parameters differ from rank 0's"


def test_a_broadcast_checkpoint_loads_with_the_safe_loader():
    """With several ranks, rank 0 reads the checkpoint and sends it to the others as a torch pickle
    (tensors apart) that holds the OmegaConf config; the other ranks load it with weights_only."""
    import io

    from fairseq.distributed import utils as distributed_utils
    from omegaconf import OmegaConf

    state = {"cfg": OmegaConf.create({"model": {"_name": "slam_tiny", "encoder_layers": [2, 2]},
                                      "common": {"seed": 1, "fp16": False, "lr": [1e-3]}}),
             "model": {"weight": torch.arange(6.0).view(2, 3)}, "extra_state": {"epoch": 2}}
    tensors = []
    buffer = io.BytesIO()
    torch.save(distributed_utils._split_tensors_from_obj(state, tensors), buffer)
    buffer.seek(0)
    loaded = distributed_utils._put_tensors_in_obj(torch.load(buffer, map_location="cpu", weights_only=True),
                                                   tensors)
    assert loaded["cfg"].model._name == "slam_tiny" and list(loaded["cfg"].common.lr) == [1e-3]
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])


def test_two_ranks_pretraining_validation_stage_switch_checkpoint_and_resume(data_dir, tmp_path):
    save_dir, hash_dir = tmp_path / "checkpoints", tmp_path / "hashes"
    env = dist.hash_env(dist.base_env(), hash_dir)
    # 5 steps per epoch over 2 ranks: 3 updates an epoch (rank 1's third is a dummy batch);
    # stage 2 (pairs) from update 2; validation after every epoch.
    first = dist.train_ranks(pretraining_args(data_dir, save_dir, 4, "--stage2-start-update", "2"),
                             2, tmp_path / "logs1", env)
    log = first[0].output
    assert "distributed init (rank 0)" in log and "distributed init (rank 1)" in first[1].output
    assert "stage 2 starts at update 2: adding TLM + STM" in log
    valid = _records(log, "valid")
    assert len(valid) == 2, "validation after epoch 1 (update 3) and at the end (update 4)"
    for record in valid:
        # every modality's validation batches were seen by one of the ranks and summed
        assert {"valid_msm_contrastive_loss", "valid_span_masking_loss", "valid_tlm_text_loss",
                "valid_stm_loss"} <= set(record)
        # a mean over the 2 validation steps of the summed ranks: (2 + 2 + 1) / 2
        assert float(record["valid_nsentences_speech"]) == 2.5
        assert float(record["valid_nsentences_text"]) == 3.0 and float(record["valid_nsentences_pair"]) == 1.5
    inner = _records(log, "train_inner")
    assert [int(r["num_updates"]) for r in inner] == [1, 2, 3, 4]
    assert "tlm_text_loss" not in inner[1] and "tlm_text_loss" in inner[2]
    assert (save_dir / "checkpoint_last.pt").is_file()

    second = dist.train_ranks(pretraining_args(data_dir, save_dir, 7, "--stage2-start-update", "2"),
                              2, tmp_path / "logs2", env)
    log = second[0].output
    assert "Loaded checkpoint" in log and "training in stage 2 from update 4" in log
    assert [int(r["num_updates"]) for r in _records(log, "train_inner")] == [5, 6, 7]
    assert len(_records(log, "valid")) == 2
    _assert_same_parameters_on_every_rank(hash_dir, 2, list(range(1, 8)))

    # the same 7 updates without the stop after update 4 (mid-epoch, in stage 2): the same
    # parameters after every update
    whole_dir = tmp_path / "hashes_whole"
    dist.train_ranks(pretraining_args(data_dir, tmp_path / "whole", 7, "--stage2-start-update", "2"),
                     2, tmp_path / "logs_whole", dist.hash_env(dist.base_env(), whole_dir))
    assert dist.read_hashes(whole_dir)[0] == dist.read_hashes(hash_dir)[0]


def test_two_ranks_leave_pairs_out_of_stage_1_epochs_and_agree_through_the_switch(data_dir, tmp_path):
    """5 steps an epoch over 2 ranks: at most 3 updates an epoch (rank 1's last is fairseq's dummy
    batch, which holds every modality); stage 2 from update 6: epoch 2 (updates 3 .. 5) does not
    read the pairs, epoch 3 does; the ranks' parameters agree after every update."""
    hash_dir = tmp_path / "hashes"
    args = pretraining_args(data_dir, tmp_path / "checkpoints", 8, "--stage2-start-update", "6",
                            "--ddp-backend", "legacy_ddp", "--disable-validation")
    finished = dist.train_ranks(args, 2, tmp_path / "logs", dist.hash_env(dist.base_env(), hash_dir))
    log = finished[0].output
    assert "epoch 2: no update of it trains pair: those batches are not read" in log
    assert "epoch 1: no update" not in log and "epoch 3: no update" not in log
    inner = {int(r["num_updates"]): r for r in _records(log, "train_inner")}
    assert sorted(inner) == list(range(1, 9))
    assert all(("tlm_text_loss" in inner[u]) == (u > 6) for u in inner)
    _assert_same_parameters_on_every_rank(hash_dir, 2, list(range(1, 9)))


def test_two_ranks_finetuning_with_a_frozen_encoder(tmp_path):
    import s2t_fixtures

    root = tmp_path / "data"
    features = s2t_fixtures.synthesize_features(root)
    task = s2t_fixtures.build_asr(root, features, specaugment=False)
    # a validation split of its own (the same rows): fairseq shares one epoch iterator between
    # subsets of one dataset object
    (root / f"valid_{task}.tsv").write_bytes((root / f"train_{task}.tsv").read_bytes())
    checkpoint, checkpoint_state = s2t_fixtures.save_slam_checkpoint(tmp_path / "slam_tiny.pt", seed=7)
    save_dir, hash_dir = tmp_path / "checkpoints", tmp_path / "hashes"
    args = [root, "--user-dir", dist.USER_DIR, "--task", "speech_to_text", "--config-yaml", f"config_{task}.yaml",
            "--train-subset", f"train_{task}", "--valid-subset", f"valid_{task}", "--save-dir", save_dir,
            "--arch", "slam_s2t_tiny", "--load-pretrained-slam-from", checkpoint, "--freeze-encoder-updates", "2",
            "--criterion", "label_smoothed_cross_entropy_with_ctc", "--ctc-weight", "0.3",
            "--max-sentences", "2", "--required-batch-size-multiple", "1", "--optimizer", "adam", "--lr", "2e-3",
            "--max-update", "4", "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "1",
            "--log-format", "json", "--log-interval", "1"]
    ranks = dist.train_ranks(args, 2, tmp_path / "logs", dist.hash_env(dist.base_env(), hash_dir))
    log = ranks[0].output
    assert "pre-trained SLAM encoder from" in log and "ctc_loss" in log
    # 6 utterances in batches of 2 over 2 ranks: 2 updates an epoch, rank 1's second a dummy batch
    valid = _records(log, f"valid_{task}")
    assert len(valid) == 2 and all(float(record[f"valid_{task}_bsz"]) == 3.0 for record in valid)
    _assert_same_parameters_on_every_rank(hash_dir, 2, [1, 2, 3, 4])

    from fairseq import checkpoint_utils

    last = checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / "checkpoint_last.pt"))["model"]
    encoder_keys = [key for key in checkpoint_state if key.startswith("encoder.speech_encoder.") and key in last]
    assert encoder_keys
    moved = [key for key in encoder_keys if not torch.equal(last[key], checkpoint_state[key])]
    assert moved, "the encoder trains once unfrozen (updates 3 and 4)"


def test_torchrun_two_ranks_make_the_update_of_one_rank_with_update_freq_2(data_dir, tmp_path):
    """Also the launch as users launch: ``torchrun --nproc_per_node 2 -m slam_fairseq.launch``."""
    import shutil

    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.fail("torchrun (installed with torch) is not on PATH")
    # Text + pairs only (their masks come from the data; the random-projection quantizer draws
    # nothing) and no dropout: the updates are deterministic functions of the batches. One rank
    # with --update-freq 2 groups batches (0, 1), (2, 3), ...; two ranks take batches 0 and 1 of
    # the same shuffled list (rank r: r, r + 2, ...), so both see the same batches per update.
    common = ["--stage1-modalities", "text,pair", "--stage2-start-update", "-1", "--quantizer-type",
              "random_projection", *NO_DROPOUT, "--max-sentences-text", "3", "--max-sentences-pair", "2",
              "--epoch-modality", "text", "--disable-validation"]
    two_args = pretraining_args(data_dir, tmp_path / "two", 4, *common)
    two_args.remove("--user-dir")
    two_args.remove(dist.USER_DIR)  # the launcher adds it
    hash_dir = tmp_path / "hashes"
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(dist.free_port()), "-m", "slam_fairseq.launch", *two_args]
    (two_ranks,) = dist.launch([command], tmp_path / "logs2", dist.hash_env(dist.base_env(), hash_dir))
    one_rank = dist.launch([dist.fairseq_train(*pretraining_args(data_dir, tmp_path / "one", 4, *common),
                                               "--update-freq", "2", "--cpu")], tmp_path / "logs1", dist.base_env())

    log = two_ranks.output
    assert "training on 2 devices" in log
    assert "slam-fairseq-train adds: --distributed-world-size 2 --distributed-rank 1 --distributed-no-spawn" in log
    assert "--distributed-backend gloo --ddp-backend legacy_ddp --cpu --user-dir" in log
    assert "without fairseq's distributed flags" not in log
    _assert_same_parameters_on_every_rank(hash_dir, 2, [1, 2, 3, 4])

    losses_two = [float(r["loss"]) for r in _records(log, "train_inner")]
    losses_one = [float(r["loss"]) for r in _records(one_rank[0].output, "train_inner")]
    assert len(losses_two) == len(losses_one) == 4
    assert losses_two == pytest.approx(losses_one, abs=2e-3)  # logged rounded to 3 decimals
    assert losses_one[0] != losses_one[-1], "the updates changed the model"

    from fairseq import checkpoint_utils

    two = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "two" / "checkpoint_last.pt"))["model"]
    one = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "one" / "checkpoint_last.pt"))["model"]
    assert sorted(two) == sorted(one)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=f"{key} differs")


_ONE_RANK_CANNOT_OPEN = (
    "import sys\n"
    "import slam_fairseq.data.pretraining.row_checks as row_checks\n"
    "hidden, original = set(sys.argv[1].split(',')), row_checks.feature_row_problem\n"
    "def flaky(audio_field, *args, **kwargs):  # a network file system failing this rank for a moment\n"
    "    if audio_field in hidden:\n"
    "        return row_checks.MISSING_FILE, 'cannot be opened (Stale file handle)'\n"
    "    return original(audio_field, *args, **kwargs)\n"
    "row_checks.feature_row_problem = flaky\n"
    "from fairseq_cli.train import cli_main\n"
    "sys.argv = ['fairseq-train', *sys.argv[2:]]\n"
    "cli_main()\n"
)


def test_rows_one_rank_cannot_open_at_load_are_dropped_by_every_rank(data_dir, tmp_path):
    """Rank 1 fails to open two training rows' features at load, in its half of the rows (each
    rank checks one half): alone, it would build 4 speech steps an epoch against rank 0's 5, and
    the ranks would part at the first collective. Every rank drops the rows any rank found bad:
    the same batches, one update stream."""
    rows = (data_dir / "speech_train.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert len(rows) == 11
    hidden = [row.split("\t")[header.index("audio")] for row in rows[7:9]]  # rows 6 and 7 of 10
    hash_dir = tmp_path / "hashes"
    env = dist.hash_env(dist.base_env(), hash_dir)
    args = pretraining_args(data_dir, tmp_path / "checkpoints", 4, "--stage2-start-update", "2")
    port = dist.free_port()
    commands = [dist.fairseq_train(*args, *dist.rank_flags(0, 2, port)),
                [sys.executable, "-c", _ONE_RANK_CANNOT_OPEN, ",".join(hidden), *args, *dist.rank_flags(1, 2, port)]]
    finished = dist.launch(commands, tmp_path / "logs", env, timeout=240)
    for rank, run in enumerate(finished):
        assert "speech_train.tsv: dropped 2 of 10 rows whose features cannot be used: 2 feature file missing" \
            in run.output, f"rank {rank}"
    # fairseq logs INFO on rank 0 only
    assert "round robin over {'speech': 4," in finished[0].output, "8 speech rows, 4 batches of 2"
    _assert_same_parameters_on_every_rank(hash_dir, 2, [1, 2, 3, 4])


def test_fairseq_trains_two_ranks_with_its_default_ddp_backend(data_dir, tmp_path):
    """fairseq's default ``--ddp-backend pytorch_ddp`` (what ``fairseq-train`` on a node of several
    GPUs gets): PyTorch's DDP cannot take one backward per modality (and on the CPU fairseq hands
    it device_ids); the task switches the run to legacy_ddp, with a WARNING, and both ranks train."""
    hash_dir = tmp_path / "hashes"
    env = dist.hash_env(dist.base_env(), hash_dir)
    args = pretraining_args(data_dir, tmp_path / "checkpoints", 3, "--stage2-start-update", "1")
    port = dist.free_port()
    commands = []
    for rank in range(2):
        flags = dist.rank_flags(rank, 2, port)
        at = flags.index("--ddp-backend")
        commands.append(dist.fairseq_train(*args, *flags[:at], *flags[at + 2:]))  # fairseq's default
    finished = dist.launch(commands, tmp_path / "logs", env, timeout=240)
    assert "--ddp-backend pytorch_ddp -> legacy_ddp: slam_pretraining runs one backward pass per modality" \
        in finished[0].output
    _assert_same_parameters_on_every_rank(hash_dir, 2, [1, 2, 3])
