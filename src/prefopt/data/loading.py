"""Read raw rows from local files, `datasets` folders or the Hub, and load preference data.

`read_rows` only reads (JSON, JSONL, Parquet, CSV, a `save_to_disk` folder, or a Hub dataset id);
`load_preference_data` reads and then normalises with `formats.normalize_rows`.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from prefopt.data.fields import DEFAULT_COLUMNS, ColumnMap, describe_type
from prefopt.data.formats import normalize_rows
from prefopt.data.records import LoadReport, PreferencePair, UnpairedExample, UnreadableRow
from prefopt.errors import DataError

Row = dict[str, Any]

HUB_TIMEOUT_S = 10.0
"""Seconds to wait for the Hub to answer before calling it unreachable."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_rows(
    source: str | Path, *, split: str | None = None, on_error: Literal["raise", "skip"] = "raise"
) -> list[Row]:
    """Read raw rows (column name -> value) from a file, a `datasets` folder or the Hub.

    Args:
        source: A `.json` file (a list of objects, or {"data": [...]}), `.jsonl`, `.parquet` or
            `.csv` file; a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            otherwise a Hub dataset id, loaded with `datasets.load_dataset`.
        split: Split of a `DatasetDict` folder or Hub dataset (default "train").
        on_error: "skip": in a JSONL file, a line that is not valid JSON or holds bytes that
            are not UTF-8 becomes an empty `UnreadableRow` (so later rows keep their indices),
            which `normalize_rows` drops and counts. Whole-file problems (a broken .json
            document or CSV, an empty file) still raise.

    Returns:
        The rows, in source order.

    Raises:
        DataError: For a missing or unreadable source, bad bytes or JSON (naming the row), an
            empty source, an unknown split, or a Hub dataset that cannot be reached.
    """
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"unsupported file type '{path.suffix}' (expected {', '.join(_READERS)})",
                file=str(path),
            )
        rows = _read_jsonl(path, skip=True) if _skips_lines(path, on_error) else reader(path)
        if not rows:
            raise DataError("the file holds no rows", file=str(path))
        return rows
    name = str(source)
    if path.suffix.lower() in _READERS or not _HUB_ID.match(name):
        raise DataError("no such file or folder", file=name)
    return _read_hub(name, split)


def load_preference_data(
    source: str | Path,
    *,
    format: str = "auto",
    columns: ColumnMap = DEFAULT_COLUMNS,
    split: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> tuple[list[PreferencePair] | list[UnpairedExample], LoadReport]:
    """Read `source` (see `read_rows`) and normalise its rows (see `normalize_rows`).

    Returns:
        The examples and a report naming the detected format and what was dropped.
    """
    rows = read_rows(source, split=split, on_error=on_error)
    return normalize_rows(
        rows, format=format, columns=columns, source=str(source), on_error=on_error
    )


# ---------------------------------------------------------------------------------------------
# Text files: bytes -> str with row-precise errors for bad UTF-8


def _read_text(path: Path) -> tuple[str, bool]:
    """The file's text and whether it held bytes that are not UTF-8.

    Bad bytes are kept as lone surrogates (errors="surrogateescape") so that, after parsing,
    `_raise_on_bad_bytes` can name the row and field holding them.
    """
    data = path.read_bytes()
    if not data.strip():
        raise DataError("the file is empty", file=str(path))
    try:
        return data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        return data.decode("utf-8-sig", errors="surrogateescape"), True


def _has_escaped_bytes(text: str) -> bool:
    # surrogateescape maps each undecodable byte 0x80-0xFF to U+DC80-U+DCFF.
    return any("\udc80" <= char <= "\udcff" for char in text)


def _bad_bytes_field(value: Any, field: str) -> str | None:
    """Path of the first string under `value` holding an escaped non-UTF-8 byte, if any."""
    if isinstance(value, str):
        return field if _has_escaped_bytes(value) else None
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        sub = f"{field}[{key}]" if isinstance(key, int) else f"{field}.{key}"
        found = _bad_bytes_field(item, sub)
        if found is not None:
            return found
    return None


def _raise_on_bad_bytes(rows: list[Row], path: Path) -> None:
    for index, row in enumerate(rows):
        for column, value in row.items():
            field = str(column) if _has_escaped_bytes(str(column)) else None
            field = field or _bad_bytes_field(value, str(column))
            if field is not None:
                raise DataError(
                    "text is not valid UTF-8 (re-encode the file as UTF-8)",
                    file=str(path),
                    row=index,
                    field=field,
                )
    raise DataError("the file is not valid UTF-8 (re-encode it as UTF-8)", file=str(path))


def _check_object(value: Any, path: Path, index: int) -> Row:
    if not isinstance(value, dict):
        raise DataError(
            f"expected a row object (column -> value), got {describe_type(value)}",
            file=str(path),
            row=index,
        )
    return value


def _read_json(path: Path) -> list[Row]:
    text, bad_bytes = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # one object per line: JSON Lines named .json
            return _read_jsonl(path)
        raise DataError(
            f"invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}",
            file=str(path),
        ) from error
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(
            'expected a list of row objects or {"data": [...]}, got ' + describe_type(data),
            file=str(path),
        )
    rows = [_check_object(value, path, index) for index, value in enumerate(data)]
    if bad_bytes:
        _raise_on_bad_bytes(rows, path)
    return rows


def _skips_lines(path: Path, on_error: str) -> bool:
    """Whether `read_rows` skips unreadable lines of `path` (JSONL only: one row per line)."""
    return on_error == "skip" and path.suffix.lower() == ".jsonl"


def _read_jsonl(path: Path, *, skip: bool = False) -> list[Row]:
    text, bad_bytes = _read_text(path)
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines would also split on U+2028 etc., legal inside JSON text.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        if skip and bad_bytes and _has_escaped_bytes(line):
            rows.append(UnreadableRow("text is not valid UTF-8"))
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            if skip:
                rows.append(UnreadableRow("invalid JSON"))
                continue
            raise DataError(
                f"invalid JSON on line {line_number} (column {error.colno}): {error.msg}",
                file=str(path),
                row=len(rows),
            ) from error
        if skip and not isinstance(value, dict):
            rows.append(UnreadableRow(f"expected a row object, got {describe_type(value)}"))
            continue
        rows.append(_check_object(value, path, len(rows)))
    if bad_bytes and not skip:
        _raise_on_bad_bytes(rows, path)
    return rows


def _allow_long_csv_fields() -> None:
    """Lift csv's 131072-character field limit: a long prompt or response is a row to read
    (and truncate or refuse later, with its row named), not a parser error. The limit is a C
    long, narrower than sys.maxsize on some platforms (64-bit Windows): halve until it fits."""
    limit = sys.maxsize
    while limit > csv.field_size_limit():
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _read_csv(path: Path) -> list[Row]:
    """CSV rows with every value as text (no type guessing: "true", "" and "1" stay text)."""
    text, bad_bytes = _read_text(path)
    _allow_long_csv_fields()
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows: list[Row] = []
    header: Sequence[str] | None = None
    try:
        header = reader.fieldnames or []
        for index, record in enumerate(reader):
            if None in record:
                raise DataError(
                    f"more values than the {len(header)} header columns",
                    file=str(path),
                    row=index,
                )
            missing = [column for column, value in record.items() if value is None]
            if missing:
                raise DataError(
                    "fewer values than header columns", file=str(path), row=index, field=missing[0]
                )
            rows.append(dict(record))
    except csv.Error as error:  # Python's csv is lenient: little but a size limit gets here
        in_header = header is None
        raise DataError(
            f"invalid CSV{' header' if in_header else ''}: {error}",
            file=str(path),
            row=None if in_header else len(rows),
        ) from error
    if bad_bytes:
        _raise_on_bad_bytes(rows, path)
    return rows


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows: list[Row] = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read Parquet: {error}", file=str(path)) from error
    return rows


_READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
    ".csv": _read_csv,
}


# ---------------------------------------------------------------------------------------------
# `datasets` folders and the Hub (datasets is imported lazily: it is slow to import)


def _read_saved_dataset(path: Path, split: str | None) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(
            "not a folder written by datasets' save_to_disk (and folders of loose files are "
            f"not read; name a file instead): {error}",
            file=str(path),
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        name = split or "train"
        if name not in loaded:
            raise DataError(
                f"no split '{name}' (splits: {', '.join(loaded)}); pass split=", file=str(path)
            )
        loaded = loaded[name]
    rows: list[Row] = loaded.to_list()
    if not rows:
        raise DataError("the dataset holds no rows", file=str(path))
    return rows


def _read_hub(name: str, split: str | None) -> list[Row]:
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        _check_hub_dataset(name)
    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except ConnectionError as error:
        raise DataError(
            "no local file or folder of that name, and the Hub dataset could not be loaded "
            f"(offline, or not in the local cache): {error}",
            file=name,
        ) from error
    except Exception as error:  # datasets raises many types; all mean "cannot load this"
        raise DataError(f"cannot load Hub dataset: {error}", file=name) from error
    rows: list[Row] = loaded.to_list()
    if not rows:
        raise DataError("the dataset holds no rows", file=name)
    return rows


def _check_hub_dataset(name: str) -> None:
    """Ask the Hub about `name` with a short timeout, so an offline machine fails in seconds.

    (`datasets.load_dataset` itself retries with backoff for about half a minute.)
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(name, timeout=HUB_TIMEOUT_S)
    except GatedRepoError as error:
        raise DataError("the Hub dataset is gated: log in with access", file=name) from error
    except RepositoryNotFoundError as error:
        raise DataError(
            "no local file or folder of that name, and no such Hub dataset (or it is private)",
            file=name,
        ) from error
    except HfHubHTTPError as error:
        raise DataError(f"the Hub refused the request: {error}", file=name) from error
    except Exception as error:  # connection refused, DNS failure, timeout, ...
        raise DataError(
            "no local file or folder of that name, and the Hub cannot be reached (offline?); "
            "set HF_HUB_OFFLINE=1 to use a cached copy",
            file=name,
        ) from error
