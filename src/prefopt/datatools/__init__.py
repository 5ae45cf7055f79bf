"""Data tools behind `prefopt data`: audit, clean, convert, build (on-policy pairs) and split.

Typical use::

    data = load_data("prefs.jsonl", on_error="skip")
    audit = audit_data(data, max_length=512)
    print(audit.summary())
    clean_data(data, audit, "prefs.clean.jsonl")

`build_pairs` (sampling with a model) loads torch and transformers when it runs; everything else
here is plain Python.
"""

from prefopt.datatools.audit import FINDINGS, AuditReport, audit_data
from prefopt.datatools.build import BuildReport, BuildSettings, build_pairs, select_pair
from prefopt.datatools.clean import CLEAN_DEFAULTS, CleanReport, clean_data
from prefopt.datatools.convert import ConvertReport, convert_data, to_rows
from prefopt.datatools.extra_formats import ranked_pairs, shp_pairs, ultrafeedback_pairs
from prefopt.datatools.loader import ALL_FORMATS, LoadedData, load_data
from prefopt.datatools.prompts import PromptRows, load_prompt_rows
from prefopt.datatools.reader import RawRows, read_raw_rows, write_jsonl
from prefopt.datatools.split import SplitReport, split_data

__all__ = [
    "ALL_FORMATS",
    "CLEAN_DEFAULTS",
    "FINDINGS",
    "AuditReport",
    "BuildReport",
    "BuildSettings",
    "CleanReport",
    "ConvertReport",
    "LoadedData",
    "PromptRows",
    "RawRows",
    "SplitReport",
    "audit_data",
    "build_pairs",
    "clean_data",
    "convert_data",
    "load_data",
    "load_prompt_rows",
    "ranked_pairs",
    "read_raw_rows",
    "select_pair",
    "shp_pairs",
    "split_data",
    "to_rows",
    "ultrafeedback_pairs",
    "write_jsonl",
]
