"""The dictionary a model was trained with travels in its checkpoint (``dictionary_fingerprint``):
a same-size dictionary with other symbols is refused when the checkpoint is loaded, where it would
otherwise be read as another vocabulary without an error. Unit tests, then a real
``fairseq-train`` resume with two dictionary lines swapped."""
from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretraining_fixtures as fixtures  # noqa: E402

from slam_fairseq.models.dictionary_fingerprint import (DictionaryMismatchError, dictionary_fingerprint,  # noqa: E402
                                                        register_fingerprint, set_fingerprint)

USER_DIR = str(fixtures.REPO_ROOT / "slam_fairseq")
SYMBOLS = ["<s>", "<pad>", "</s>", "<unk>", "▁the", "▁a", "s", "<mask>"]
SWAPPED = SYMBOLS[:4] + [SYMBOLS[5], SYMBOLS[4]] + SYMBOLS[6:]


def test_fingerprint_tells_order_and_content_apart_and_is_stable():
    same = dictionary_fingerprint(list(SYMBOLS))
    assert same.shape == (128,) and set(same.tolist()) == {-1.0, 1.0}
    assert torch.equal(same, dictionary_fingerprint(SYMBOLS))
    assert not torch.equal(same, dictionary_fingerprint(SWAPPED))
    assert not torch.equal(same, dictionary_fingerprint(SYMBOLS[:-1] + ["<mask2>"]))
    # signs are exact in half precision and come back from an average of identical checkpoints
    assert torch.equal(same.to(torch.bfloat16).float(), same) and torch.equal(same.half().float(), same)
    assert torch.equal((same * 3) / 3, same)


class _Model(nn.Module):
    def __init__(self, symbols=None):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.embed = nn.Embedding(len(symbols or SYMBOLS), 2)
        register_fingerprint(self, "dictionary_fingerprint", "text dictionary")
        if symbols is not None:
            set_fingerprint(self, "dictionary_fingerprint", symbols)


def test_loading_refuses_another_dictionary_and_accepts_older_or_unknown_fingerprints():
    model = _Model(SYMBOLS)
    state = model.state_dict()
    assert torch.equal(state["dictionary_fingerprint"], dictionary_fingerprint(SYMBOLS)), "saved with the weights"
    model.load_state_dict(state)
    with pytest.raises(DictionaryMismatchError, match="trained with another text dictionary .* same number of"):
        model.load_state_dict(_Model(SWAPPED).state_dict())
    larger = _Model(SYMBOLS + ["extra"]).state_dict()
    with pytest.raises(DictionaryMismatchError, match=rf"text dictionary than the one this run loaded, of another size "
                                                      rf"\(embed\.weight: \({len(SYMBOLS) + 1}, 2\) in the checkpoint, "
                                                      rf"\({len(SYMBOLS)}, 2\) in this run's model\)"):
        model.load_state_dict(larger)

    older = collections.OrderedDict((k, v) for k, v in state.items() if k != "dictionary_fingerprint")
    model.load_state_dict(older)  # strict: the model's own fingerprint stands in
    assert "dictionary_fingerprint" not in older, "the caller's dict is not changed"
    assert torch.equal(model.dictionary_fingerprint, dictionary_fingerprint(SYMBOLS))

    unknown = _Model()  # built without a dictionary: takes the checkpoint's
    unknown.load_state_dict(state)
    assert torch.equal(unknown.dictionary_fingerprint, dictionary_fingerprint(SYMBOLS))
    known = _Model(SYMBOLS)
    known.load_state_dict(_Model().state_dict())  # an unknown one is accepted and does not replace it
    assert torch.equal(known.dictionary_fingerprint, dictionary_fingerprint(SYMBOLS))
    with pytest.raises(DictionaryMismatchError):
        known.load_state_dict(_Model(SWAPPED).state_dict())

    # an EMA's float32 copy drifts by rounding (a few percent at extreme decays), never across zero
    drifted = dict(state, dictionary_fingerprint=state["dictionary_fingerprint"] * 0.9)
    known.load_state_dict(drifted)


def test_the_check_runs_inside_wrappers_that_load_through_nn_module():
    """fairscale's FSDP loads through nn.Module's recursion (the model's own load_state_dict is not
    called); the check is a pre-hook, so it runs there too, with the wrapper's key prefix."""
    wrapped = nn.Sequential(_Model(SYMBOLS))
    with pytest.raises(DictionaryMismatchError):
        wrapped.load_state_dict(nn.Sequential(_Model(SWAPPED)).state_dict())
    older = {k: v for k, v in wrapped.state_dict().items() if not k.endswith("dictionary_fingerprint")}
    wrapped.load_state_dict(older)
    from fairscale.nn.misc import FlattenParamsWrapper

    flat = FlattenParamsWrapper(_Model(SYMBOLS))
    with pytest.raises(DictionaryMismatchError):
        flat.load_state_dict(FlattenParamsWrapper(_Model(SWAPPED)).state_dict())
    flat.load_state_dict({k: v for k, v in flat.state_dict().items() if not k.endswith("dictionary_fingerprint")})


def test_fingerprint_survives_half_precision_and_fairseqs_ema():
    model = _Model(SYMBOLS).to(torch.bfloat16)
    assert torch.equal(model.dictionary_fingerprint.float(), dictionary_fingerprint(SYMBOLS))
    _Model(SYMBOLS).load_state_dict(model.state_dict())
    from fairseq.dataclass.configs import EMAConfig
    from fairseq.models.ema import EMA

    model = _Model(SYMBOLS)
    ema = EMA(model, EMAConfig(store_ema=True, ema_decay=0.999, ema_fp32=True))
    for _ in range(3):
        ema.step(model)  # multiplies every entry by the decay: an integer buffer fails here
    _Model(SYMBOLS).load_state_dict(ema.get_model().state_dict())
    assert torch.equal(ema.get_model().dictionary_fingerprint.sign(), dictionary_fingerprint(SYMBOLS).sign())


def _swap_two_dictionary_lines(data_dir: Path) -> None:
    config = yaml.safe_load((data_dir / "config.yaml").read_text())
    path = data_dir / config["vocab_filename"]
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[10], lines[11] = lines[11], lines[10]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_resuming_with_a_same_size_dictionary_of_other_symbols_is_refused(tmp_path):
    data = fixtures.build_data_dir(tmp_path / "data", real_speech=False)
    args = [str(data), "--user-dir", USER_DIR, "--task", "slam_pretraining", "--arch", "slam_tiny",
            "--criterion", "slam_multitask", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8",
            "--max-sentences-speech", "4", "--max-sentences-text", "4", "--max-sentences-pair", "3",
            "--stage2-start-update", "1", "--save-dir", str(tmp_path / "ck"), "--no-epoch-checkpoints",
            "--cpu", "--seed", "3", "--log-format", "json", "--log-interval", "1", "--ddp-backend", "legacy_ddp",
            "--disable-validation"]
    first = fixtures.run_fairseq(args + ["--max-update", "2"], stand_in=False)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    saved = torch.load(tmp_path / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["model"]["dictionary_fingerprint"].shape == (128,)

    same = fixtures.run_fairseq(args + ["--max-update", "3"], stand_in=False)
    assert same.returncode == 0 and "Loaded checkpoint" in same.stdout + same.stderr, "the same dictionary resumes"

    shutil.copy(tmp_path / "ck" / "checkpoint_last.pt", tmp_path / "kept.pt")
    _swap_two_dictionary_lines(data)
    swapped = fixtures.run_fairseq(args + ["--max-update", "4"], stand_in=False)
    output = swapped.stdout + swapped.stderr
    assert swapped.returncode != 0
    assert "DictionaryMismatchError" in output and "another text dictionary" in output
    kept = torch.load(tmp_path / "kept.pt", map_location="cpu", weights_only=False)
    again = torch.load(tmp_path / "ck" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert again["optimizer_history"][-1]["num_updates"] == kept["optimizer_history"][-1]["num_updates"] == 3
