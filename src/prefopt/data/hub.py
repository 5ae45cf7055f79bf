"""Rows of a folder written by `datasets`' `save_to_disk`, or of a Hub dataset.

`datasets` and `huggingface_hub` are imported lazily: they are slow to import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefopt.errors import DataError

__all__ = ["HUB_TIMEOUT_S", "read_hub", "read_saved_dataset"]

Row = dict[str, Any]

HUB_TIMEOUT_S = 10.0
"""Seconds to wait for the Hub to answer before calling it unreachable."""


def read_saved_dataset(path: Path, split: str | None) -> list[Row]:
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


def read_hub(name: str, split: str | None) -> list[Row]:
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
