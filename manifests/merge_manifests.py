r"""Combine S2T manifests of several corpora into one, e.g. LibriSpeech and Common Voice pairs into
``pair_train.tsv`` or several speech-only sets into ``speech_train.tsv``.

Relative ``audio`` paths are resolved against each input's directory and rewritten relative to the
output's directory, so the merged manifest reads the same features. Ids must stay unique (a
clash is refused, naming both files). Written atomically.

    python manifests/merge_manifests.py --inputs en/pair_train.tsv cv/pair_train_es.tsv \
        --out DATA/pair_train.tsv
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slam_formats.manifest import (
    OPTIONAL_COLUMNS,
    S2T_COLUMNS,
    ManifestError,
    read_s2t_manifest,
    write_s2t_manifest,
)


def rebase_audio(audio: str, source_dir: Path, output_dir: Path) -> str:
    """An ``audio`` field (path, or ``zip:offset:length``) relative to ``output_dir``."""
    path, separator, byte_range = audio, "", ""
    parts = audio.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        path, separator, byte_range = parts[0], ":", f"{parts[1]}:{parts[2]}"
    if not os.path.isabs(path):
        path = os.path.relpath((source_dir / path).resolve(), output_dir.resolve())
    return f"{path}{separator}{byte_range}"


def merge(inputs: Sequence[Path], output: Path) -> int:
    rows: List[Dict[str, str]] = []
    origin: Dict[str, Path] = {}
    for manifest in inputs:
        for row in read_s2t_manifest(str(manifest)):
            if row["id"] in origin:
                raise ManifestError(f"id {row['id']!r} is in both {origin[row['id']]} and {manifest}")
            origin[row["id"]] = manifest
            rows.append({**row, "audio": rebase_audio(row["audio"], manifest.parent, output.parent)})
    columns = list(S2T_COLUMNS) + [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
    return write_s2t_manifest(str(output), rows, columns)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, type=Path, help="S2T manifests to combine")
    parser.add_argument("--out", required=True, type=Path, help="the combined manifest")
    args = parser.parse_args(argv)
    try:
        count = merge(args.inputs, args.out)
    except (ManifestError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    print(f"wrote {args.out}: {count} rows from {len(args.inputs)} manifests")


if __name__ == "__main__":
    main()
