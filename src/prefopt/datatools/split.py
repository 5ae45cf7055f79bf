"""`prefopt data split`: a train/eval split in which no prompt is in both files.

The split itself is `prefopt.data.split_eval` (prompt groups, seeded shuffle); this writes each
side's rows as they were read, so both files keep the source format and extra columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefopt.data.splits import split_eval
from prefopt.datatools.audit import text_key
from prefopt.datatools.loader import LoadedData
from prefopt.datatools.reader import write_jsonl

__all__ = ["SplitReport", "split_data"]


@dataclass
class SplitReport:
    """Rows and prompts on each side, and the rows left out while loading."""

    source: str
    train_out: str
    eval_out: str
    train_rows: int
    eval_rows: int
    train_prompts: int
    eval_prompts: int
    left_out: dict[str, list[int]]

    def summary(self) -> str:
        lines = [
            f"{self.source}: {self.train_rows} rows ({self.train_prompts} prompts) -> "
            f"{self.train_out}; {self.eval_rows} rows ({self.eval_prompts} prompts) -> "
            f"{self.eval_out}; no prompt in both"
        ]
        for reason, rows in self.left_out.items():
            head = ", ".join(str(r) for r in rows[:10])
            more = f", … ({len(rows) - 10} more)" if len(rows) > 10 else ""
            lines.append(f"  left out {len(rows)} ({reason}): rows {head}{more}")
        return "\n".join(lines)


def split_data(
    data: LoadedData, train_out: str | Path, eval_out: str | Path, *, fraction: float, seed: int
) -> SplitReport:
    """Split `data` by prompt (see `prefopt.data.split_eval`) and write both sides.

    Args:
        data: From `loader.load_data` with pairs="best-worst" (one example per row).
        train_out: File for the training rows (JSON Lines).
        eval_out: File for the eval rows.
        fraction: Share of rows for eval, in [0, 1).
        seed: Shuffle seed.
    """
    train, evaluation = split_eval(data.examples, fraction, seed)
    rows = data.rows
    write_jsonl(train_out, (rows[e.index] or {} for e in train))
    write_jsonl(eval_out, (rows[e.index] or {} for e in evaluation))
    return SplitReport(
        source=data.source,
        train_out=str(train_out),
        eval_out=str(eval_out),
        train_rows=len(train),
        eval_rows=len(evaluation),
        train_prompts=len({text_key(e.prompt) for e in train}),
        eval_prompts=len({text_key(e.prompt) for e in evaluation}),
        left_out=data.report.dropped,
    )
