"""A build's files: where they are, what they say is done, and the settings they were made
with, so that a re-run resumes (see `build`'s module docstring)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from prefopt.data.records import Text
from prefopt.datatools.reader import write_jsonl
from prefopt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from prefopt.datatools.build import BuildReport, BuildSettings

__all__ = [
    "append_line",
    "build_paths",
    "check_settings",
    "done_prompts",
    "finish_build",
    "prompt_json",
]

Row = dict[str, Any]


def build_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """(pairs file, samples file, settings file) of a build writing `output`."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out, out.with_name(stem + ".samples.jsonl"), out.with_name(stem + ".build.json")


def prompt_json(prompt: Text) -> Any:
    return prompt if isinstance(prompt, str) else [dict(m) for m in prompt]


def _read_records(path: Path) -> list[Row]:
    """The complete lines of a build's append-only JSONL file.

    A torn last line (a write cut short by an interrupt) is cut off the file, but only once
    every complete line has proved to be a build record: another file is never changed.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for number, line in enumerate(data[:end].decode("utf-8").split("\n")[:-1]):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("prompt_index"), int):
            raise DataError(
                "not a `prefopt data build` record (no prompt_index); write to a new --output",
                file=str(path),
                row=number,
            )
        rows.append(row)
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    return rows


def done_prompts(paths: tuple[Path, Path, Path], prompts: Sequence[Text]) -> set[int]:
    """Indices of prompts already done, after checking they are the same prompts."""
    done: set[int] = set()
    for path in paths[:2]:
        for number, row in enumerate(_read_records(path)):
            i = row["prompt_index"]
            if not 0 <= i < len(prompts) or row.get("prompt") != prompt_json(prompts[i]):
                raise DataError(
                    f"prompt_index {i} does not match prompt {i} of the prompts file (the "
                    "prompts changed since this build started); write to a new --output",
                    file=str(path),
                    row=number,
                )
            done.add(i)
    return done


def check_settings(
    path: Path, settings: BuildSettings, model: str, prompts_file: str, prompts: Sequence[Text]
) -> None:
    """Refuse a build recorded with other settings, then record these (making the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recorded = {**settings.recorded(), "model": model}
    if settings.sampling == "per-batch":
        # The batch plan, so every reply, depends on the whole prompt list: it must not change.
        listed = json.dumps([prompt_json(p) for p in prompts], ensure_ascii=False)
        recorded["prompts_sha256"] = hashlib.sha256(listed.encode()).hexdigest()
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
        changed = {k: (before.get(k), v) for k, v in recorded.items() if before.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"{path} records a build with other settings ({listed}); resume with the same "
                "settings, or write to a new --output"
            )
    meta = {"settings": recorded, "prompts_file": prompts_file}  # where from: not checked
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def append_line(f: TextIO, row: Row) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def finish_build(
    paths: tuple[Path, Path, Path], report: BuildReport, settings: BuildSettings, complete: bool
) -> None:
    """Count from the files, sort the pairs by prompt index, record the counts."""
    rows = _read_records(paths[0])
    records = _read_records(paths[1])
    report.pairs = len(rows)
    report.replies = sum(len(r["replies"]) for r in records)
    report.empty_replies = sum(1 for r in records for t in r["replies"] if not t)
    report.cut_off_replies = sum(sum(r["cut_off"]) for r in records)
    report.dropped_small_gap = sum(r["outcome"] == "small_gap" for r in records)
    report.dropped_too_few_replies = sum(r["outcome"] == "too_few_replies" for r in records)
    report.dropped_bad_score = sum(r["outcome"] == "bad_score" for r in records)
    if complete:
        write_jsonl(paths[0], sorted(rows, key=lambda r: r["prompt_index"]))
    meta = json.loads(paths[2].read_text(encoding="utf-8"))
    meta.update(complete=complete, counts=asdict(report))
    paths[2].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
