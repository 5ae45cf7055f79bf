"""`prefopt data convert`: any supported source format to prefopt's paired or unpaired JSONL.

Sources (`--from`, or detected): prefopt's own formats (standard, conversational, implicit
prompt, Anthropic HH, UltraFeedback, unpaired; parsed by `prefopt.data`), SHP and ranked lists
(`extra_formats`). Targets:

* "standard": `{prompt, chosen, rejected, source_index}` per pair. Text stays text and
  conversations stay message lists (HH becomes conversations), as prefopt reads both.
* "unpaired": `{prompt, completion, label, source_index}` for KTO, two rows per pair (chosen
  True, then rejected False; `prefopt.data.pairs_to_unpaired`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefopt.data.records import PreferencePair, Text, UnpairedExample
from prefopt.data.splits import pairs_to_unpaired
from prefopt.datatools.loader import LoadedData
from prefopt.datatools.reader import write_jsonl
from prefopt.errors import ConfigError

__all__ = ["TARGETS", "ConvertReport", "Target", "convert_data", "to_rows"]

Target = Literal["standard", "unpaired"]
TARGETS: tuple[Target, ...] = ("standard", "unpaired")


@dataclass
class ConvertReport:
    """What `convert_data` read and wrote."""

    source: str
    format: str
    output: str
    target: str
    rows_in: int
    rows_out: int
    load_summary: str

    def summary(self) -> str:
        return f"{self.load_summary}\nwrote {self.rows_out} {self.target} rows to {self.output}"


def _json(text: Text) -> Any:
    return text if isinstance(text, str) else [dict(m) for m in text]


def to_rows(
    examples: list[PreferencePair] | list[UnpairedExample], target: Target
) -> list[dict[str, Any]]:
    """Output rows of `examples` in the target layout, each with its `source_index`.

    Raises:
        ConfigError: For unpaired examples with target "standard" (they cannot be paired).
    """
    if target not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    pairs = [e for e in examples if isinstance(e, PreferencePair)]
    if target == "standard":
        if len(pairs) != len(examples):
            raise ConfigError("unpaired (KTO) rows cannot be turned into pairs")
        return [
            {
                "prompt": _json(p.prompt),
                "chosen": _json(p.chosen),
                "rejected": _json(p.rejected),
                "source_index": p.index,
            }
            for p in pairs
        ]
    unpaired = pairs_to_unpaired(pairs) if pairs else list(examples)
    return [
        {
            "prompt": _json(e.prompt),
            "completion": _json(e.completion),
            "label": e.label,
            "source_index": e.index,
        }
        for e in unpaired
        if isinstance(e, UnpairedExample)
    ]


def convert_data(data: LoadedData, output: str | Path, target: Target) -> ConvertReport:
    """Write `data`'s examples to `output` in the target layout.

    Args:
        data: From `loader.load_data` (with the pairing wanted: best-worst or all).
        output: The JSON Lines file to write.
        target: "standard" or "unpaired".
    """
    written = write_jsonl(output, to_rows(data.examples, target))
    return ConvertReport(
        source=data.source,
        format=data.format,
        output=str(output),
        target=target,
        rows_in=len(data.rows),
        rows_out=written,
        load_summary=data.report.summary(),
    )
