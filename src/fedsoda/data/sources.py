"""Find data sets in a local folder (``--data-dir`` / ``FEDSODA_DATA_DIR``) or on the hub.

The local layout is ``DIR/<name>/<split>.jsonl`` (see ``shared/data/README.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HUB_IDS = {
    "sst2": "stanfordnlp/sst2",
    "boolq": "google/boolq",
    "gsm8k": "openai/gsm8k",
    "wikitext2": "Salesforce/wikitext",
}


class DataNotFoundError(FileNotFoundError):
    """A data set is neither in the local folder nor reachable on the hub."""


class MalformedDataError(ValueError):
    """A row of a local data file breaks the schema; the message names file and line."""


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The local data folder: the explicit argument, else ``$FEDSODA_DATA_DIR``, else None."""
    chosen = explicit or os.environ.get("FEDSODA_DATA_DIR")
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"data folder {path} does not exist (from --data-dir or "
                                "FEDSODA_DATA_DIR)")
    return path


def split_file(name: str, split: str, explicit: str | Path | None = None) -> Path:
    """Path of a local split file, or a clear error naming both ways to provide it."""
    root = data_dir(explicit)
    if root is not None:
        path = root / name / f"{split}.jsonl"
        if path.is_file():
            return path
        where = f"{path} does not exist"
    else:
        where = "no local data folder was given"
    raise DataNotFoundError(
        f"data set {name!r} split {split!r} not found: {where}. Either pass --data-dir DIR "
        f"(or set FEDSODA_DATA_DIR) to a folder with {name}/{split}.jsonl, or, with a network, "
        f"use the Hugging Face hub id {HUB_IDS.get(name, name)!r}."
    )


def read_jsonl(path: Path, fields: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read JSON Lines, checking that every row has ``fields`` of the given types."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedDataError(f"{path}:{number}: not JSON ({error.msg})") from error
            for field, kind in fields.items():
                if field not in row:
                    raise MalformedDataError(f"{path}:{number}: missing field {field!r}")
                value = row[field]
                if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                    raise MalformedDataError(
                        f"{path}:{number}: field {field!r} is {type(value).__name__}, "
                        f"expected {getattr(kind, '__name__', kind)}")
            rows.append(row)
    return rows
