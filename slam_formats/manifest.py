"""fairseq's S2T manifests (TSV): the columns, reading with checks, atomic writing."""
from __future__ import annotations

import csv
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from slam_formats.atomic import atomic_write_text

S2T_COLUMNS = ("id", "audio", "n_frames", "tgt_text", "speaker")
OPTIONAL_COLUMNS = ("src_text", "src_lang", "tgt_lang")
# fairseq's TSV dialect (no quoting), for csv readers and writers
TSV_DIALECT = dict(delimiter="\t", quotechar=None, doublequote=False, lineterminator="\n", quoting=csv.QUOTE_NONE)


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the row."""


def not_utf8_error(path: str, error: UnicodeDecodeError) -> ManifestError:
    """A :class:`ManifestError` naming the first line of ``path`` that is not UTF-8 and its first
    bad byte (found by reading the file again as bytes: a decoder reading ahead in blocks does not
    know the line)."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return ManifestError(f"{path}:{line_number}: not UTF-8 (byte 0x{raw[bad.start]:02x} at column "
                                     f"{bad.start + 1}); convert the file to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8), "
                                     f"or make it again with the manifest scripts, which skip such lines")
    return ManifestError(f"{path}: not UTF-8 ({error.reason})")


def iter_s2t_manifest(path: str) -> Iterator[Dict[str, str]]:
    """The rows of an S2T TSV as dicts, one at a time (a manifest of millions of rows is never
    held as dicts); checks the required columns and ``n_frames``. A UTF-8 byte-order mark (an
    editor's) before the header is dropped."""
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, **TSV_DIALECT)
            missing = [c for c in ("id", "audio", "n_frames") if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
            for line_number, row in enumerate(reader, start=2):
                if not str(row.get("n_frames", "")).isdigit():
                    raise ManifestError(f"{path}:{line_number}: n_frames {row.get('n_frames')!r} is not a count")
                yield {key: (value if value is not None else "") for key, value in row.items()}
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, error) from None


def read_s2t_manifest(path: str) -> List[Dict[str, str]]:
    """All rows of an S2T TSV as dicts (:func:`iter_s2t_manifest`'s checks)."""
    return list(iter_s2t_manifest(path))


def write_s2t_manifest(path: str, rows: Iterable[Dict[str, object]],
                       columns: Optional[Sequence[str]] = None) -> int:
    """Write rows atomically in fairseq's TSV dialect; returns the number of rows written."""
    rows = list(rows)
    if columns is None:
        extra = [c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)]
        columns = list(S2T_COLUMNS) + extra
    lines = ["\t".join(columns)]
    for row in rows:
        values = []
        for column in columns:
            value = str(row.get(column, ""))
            if "\t" in value or "\n" in value:
                raise ManifestError(f"{path}: a tab or newline in column {column!r} of row {row.get('id')}")
            values.append(value)
        lines.append("\t".join(values))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return len(rows)
