"""Typed config: YAML + overrides, type checks with dotted names, validation rules, round trip."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from prefopt.config import ExperimentConfig, LossConfig, ReferenceConfig
from prefopt.config_io import load_config, save_config, to_dict
from prefopt.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.yaml"))


def _write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# --- loading and overrides ------------------------------------------------------------------


def test_defaults_validate_and_equal_the_dataclass_defaults() -> None:
    cfg = load_config()
    cfg.validate()
    assert cfg == ExperimentConfig()
    assert cfg.loss.name == "sigmoid"
    assert cfg.reference_strategy() == "copy"


def test_yaml_then_overrides_win(tmp_path: Path) -> None:
    path = _write_yaml(
        tmp_path / "run.yaml",
        {"loss": {"beta": 0.3, "name": "ipo"}, "train": {"batch_size": 8, "seed": 1}},
    )
    cfg = load_config(path, ["loss.beta=0.05", "train.seed=7", "data.columns.prompt=question"])
    assert cfg.loss.name == "ipo"  # from the file, untouched by overrides
    assert cfg.loss.beta == 0.05  # override beats the file
    assert cfg.train.batch_size == 8
    assert cfg.train.seed == 7
    assert cfg.data.columns.prompt == "question"  # two levels deep
    assert cfg.data.columns.chosen == "chosen"  # siblings keep their defaults


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = load_config(
        None,
        [
            "loss.name=[sigmoid,sft]",
            "loss.weights=[1,0.2]",
            "optim.lr=1e-6",  # YAML 1.1 reads this as the string "1e-6"
            "output.progress=false",
            "lora.enabled=true",
            "train.max_steps=null",
            "optim.max_grad_norm=null",
            "train.epochs=2",  # an int where a float is expected
            "output.report_to=[jsonl]",
        ],
    )
    assert cfg.loss.name == ["sigmoid", "sft"]
    assert cfg.loss.weights == [1.0, 0.2]
    assert all(type(w) is float for w in cfg.loss.weights)
    assert cfg.optim.lr == 1e-6 and type(cfg.optim.lr) is float
    assert cfg.output.progress is False
    assert cfg.lora.enabled is True
    assert cfg.train.max_steps is None
    assert cfg.optim.max_grad_norm is None
    assert cfg.train.epochs == 2.0 and type(cfg.train.epochs) is float
    assert cfg.output.report_to == ["jsonl"]


def test_yaml_file_reads_exponent_without_dot_as_number(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 5e-6\n  adam_eps: 1e-10\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.optim.lr == 5e-6
    assert cfg.optim.adam_eps == 1e-10


@pytest.mark.parametrize(
    ("override", "field", "value"),
    [
        ("resume=latest", "output.resume", "latest"),
        ("output_dir=runs/a", "output.dir", "runs/a"),
        ("model=some/folder", "model.name_or_path", "some/folder"),
    ],
)
def test_override_aliases(override: str, field: str, value: str) -> None:
    cfg = load_config(None, [override])
    section, name = field.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_empty_yaml_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n", encoding="utf-8")
    assert load_config(empty) == ExperimentConfig()
    # A section whose keys are all commented out is `null` in YAML.
    commented = tmp_path / "commented.yaml"
    commented.write_text("lora:\n  # r: 8\ntrain:\n  seed: 3\n", encoding="utf-8")
    cfg = load_config(commented, ["lora.r=4"])
    assert cfg.lora.r == 4
    assert cfg.train.seed == 3


# --- errors that name the field -------------------------------------------------------------


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'loss\.beta'"):
        load_config(None, ["loss.bta=0.2"])


def test_unknown_section_suggests_the_close_one(tmp_path: Path) -> None:
    path = _write_yaml(tmp_path / "run.yaml", {"optimm": {"lr": 1e-6}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimm'.*did you mean 'optim'"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.batch_size=abc", r"train\.batch_size: expected an integer, got 'abc'"),
        ("train.batch_size=1.5", r"train\.batch_size: expected an integer"),
        ("train.batch_size=true", r"train\.batch_size: expected an integer"),
        ("train.max_steps=true", r"train\.max_steps: expected an integer"),
        ("lora.enabled=yes please", r"lora\.enabled: expected true/false"),
        ("optim.lr=fast", r"optim\.lr: expected a finite number"),
        ("optim.lr=nan", r"optim\.lr: expected a finite number"),
        ("loss.beta=.inf", r"loss\.beta: expected a finite number"),
        ("optim.max_grad_norm=nan", r"optim\.max_grad_norm: expected a finite number"),
        ("optim.adam_betas=[0.9,x]", r"optim\.adam_betas\[1\]: expected a finite number"),
        ("optim.adam_betas=0.9", r"optim\.adam_betas: expected a list"),
        ("data.columns.prompt=[a]", r"data\.columns\.prompt: expected a string"),
        ("train=3", r"^train: expected a mapping, got int"),
        ("data.columns=x", r"^data\.columns: expected a mapping"),
    ],
)
def test_wrong_types_name_the_dotted_field(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_literal_violation_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.scheduler=cosin"])
    message = str(info.value)
    assert message.startswith("optim.scheduler: 'cosin' is not one of")
    for choice in ("linear", "cosine", "constant"):
        assert f"'{choice}'" in message


@pytest.mark.parametrize("text", ["no", "off"])
def test_yaml_bool_words_stay_choice_words(text: str, tmp_path: Path) -> None:
    """YAML 1.1 reads `no` as False; `train.mixed_precision=no` means the choice "no"."""
    assert load_config(None, [f"train.mixed_precision={text}"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path, []).train.mixed_precision == "no"


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["loss.beta"])


def test_override_into_a_scalar_is_refused() -> None:
    with pytest.raises(ConfigError, match="'beta' is not a section"):
        load_config(None, ["loss.beta=0.1", "loss.beta.x=1"])


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("loss: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)


# --- validate(): every rule -----------------------------------------------------------------


def test_unknown_loss_gets_a_hint_and_the_known_list() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["loss.name=sigmod"])
    message = str(info.value)
    assert "unknown loss 'sigmod'" in message
    assert "did you mean 'sigmoid'" in message
    assert "ipo" in message and "simpo" in message  # the known names are listed


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["loss.name=[]"], r"loss\.name: give at least one loss"),
        (["loss.name=[kto,sft]"], r"'kto' works on unpaired data and cannot be combined"),
        (["loss.name=[sigmoid,sft]", "loss.weights=[1]"], r"loss\.weights has 1 values for 2"),
        (["loss.weights=[1,2]"], r"loss\.weights has 2 values for 1"),
        (["loss.beta=0"], r"loss\.beta must be > 0"),
        (["loss.beta=-0.1"], r"loss\.beta must be > 0"),
        (["loss.label_smoothing=0.5"], r"label_smoothing must be in \[0, 0\.5\)"),
        (["loss.label_smoothing=-0.1"], r"label_smoothing must be in \[0, 0\.5\)"),
        (["loss.name=ipo", "loss.label_smoothing=0.1"], r"label_smoothing=0\.1 has no effect"),
        (["loss.name=simpo", "reference.strategy=copy"], r"reference-free"),
        (["loss.name=simpo", "reference.strategy=precompute"], r"reference-free"),
        (["loss.name=orpo", "reference.model=sft/model"], r"reference\.model is set"),
        (["reference.strategy=none"], r"reference\.strategy=none, but loss \['sigmoid'\]"),
        (["reference.strategy=adapter"], r"adapter needs lora\.enabled=true"),
        (["reference.strategy=model"], r"strategy=model needs reference\.model"),
        (
            ["reference.strategy=precompute", "reference.precompute_with=model"],
            r"precompute_with=model needs reference\.model",
        ),
        (["lora.load_in_4bit=true"], r"load_in_4bit=true needs lora\.enabled=true"),
        (
            ["lora.enabled=true", "lora.load_in_4bit=true", "reference.strategy=copy"],
            r"reference\.strategy=copy with lora\.load_in_4bit=true: use reference\.strategy=ad",
        ),
        (["data.max_prompt_length=512"], r"max_prompt_length=512 must be in \[1, data\.max_len"),
        (["data.max_prompt_length=0"], r"max_prompt_length=0 must be in"),
        (["output.report_to=[jsonl,mlflow]"], r"unknown logger 'mlflow'"),
        (
            ["loss.name=kto", "reference.strategy=precompute"],
            r"precompute is not supported with kto",
        ),
    ],
)
def test_validate_rules(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override",
    [
        "train.batch_size=0",
        "train.grad_accum=0",
        "train.epochs=0",
        "train.max_steps=0",
        "train.num_threads=0",
        "train.logit_chunk_size=0",
        "train.stop_after_steps=0",
        "optim.lr=0",
        "optim.lr=-1e-6",
        "optim.warmup_ratio=1",
        "optim.warmup_steps=-1",
        "optim.weight_decay=-0.1",
        "optim.adam_eps=0",
        "optim.max_grad_norm=0",
        "optim.adam_betas=[0.9]",
        "optim.adam_betas=[0.9,1.0]",
        "data.max_length=1",
        "data.eval_fraction=1",
        "data.max_pairs=0",
        "lora.r=0",
        "lora.alpha=0",
        "lora.alpha=-16",
        "lora.dropout=1",
        "eval.patience=0",
        "eval.batch_size=0",
        "eval.every_steps=-1",
        "output.keep_checkpoints=0",
        "output.save_every=-5",
    ],
)
def test_validate_numbers(override: str) -> None:
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)} must be"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.name=[sigmoid,sft]", "loss.weights=[1,0.2]"],
        ["loss.name=robust", "loss.label_smoothing=0.2"],
        ["loss.name=[sigmoid,sft]", "loss.label_smoothing=0.1"],  # sigmoid uses it
        ["loss.name=simpo", "reference.strategy=none"],
        ["loss.name=kto", "data.format=unpaired"],
        ["lora.enabled=true", "reference.strategy=adapter"],
        ["reference.strategy=model", "reference.model=sft/model"],
        ["reference.strategy=precompute"],
        ["data.max_prompt_length=511", "optim.max_grad_norm=null", "eval.batch_size=2"],
    ],
)
def test_valid_combinations_pass(overrides: list[str]) -> None:
    load_config(None, overrides).validate()


EARLY_STOP = ["data.eval=held_out.jsonl", "eval.every_steps=10"]
"""What early stopping needs besides its metric: evaluation data and evaluations in training."""


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            ["eval.early_stopping_metric=rewards/accuracy", *EARLY_STOP],
            r"unknown metric 'rewards/accuracy' \(did you mean 'rewards/accuracies'\?\); "
            r"evaluations of this run report: loss, rewards/chosen",
        ),
        (["eval.early_stopping_metric=eval_loss", *EARLY_STOP], r"did you mean 'loss'"),
        (  # KTO's evaluations have no margins
            ["loss.name=kto", "eval.early_stopping_metric=rewards/margins", *EARLY_STOP],
            r"unknown metric 'rewards/margins'.*report: loss, .*kl",
        ),
        (["eval.early_stopping_metric=loss", "eval.every_steps=10"], r"needs evaluation data"),
        (
            ["eval.early_stopping_metric=loss", "data.eval=held_out.jsonl"],
            r"needs evaluations during training: set eval\.every_steps",
        ),
        (
            ["eval.early_stopping_metric=loss", "data.eval_fraction=0.1", "eval.every_steps=0"],
            r"eval\.every_steps=N \(> 0\)",
        ),
    ],
)
def test_early_stopping_that_could_never_fire_is_refused(
    overrides: list[str], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=r"^eval\.early_stopping_metric"):
        load_config(None, overrides)
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.early_stopping_metric=rewards/accuracies", *EARLY_STOP],
        ["eval.early_stopping_metric=loss", "data.eval_fraction=0.1", "eval.every_steps=5"],
        ["loss.name=kto", "eval.early_stopping_metric=kl", *EARLY_STOP],
        ["data.sft=true", "loss.name=sft", "eval.early_stopping_metric=perplexity", *EARLY_STOP],
        ["eval.every_steps=0"],  # no early stopping: nothing else needed
    ],
)
def test_early_stopping_that_can_fire_passes(overrides: list[str]) -> None:
    load_config(None, overrides).validate()


def test_known_eval_metrics_are_what_evaluations_report() -> None:
    """config_checks.EVAL_METRICS lists, per kind of data, exactly the names the metric
    functions produce (a renamed metric must not leave early stopping silently off)."""
    from types import SimpleNamespace

    import torch

    from prefopt.config_checks import EVAL_METRICS
    from prefopt.losses import LossOutput, PairLogps
    from prefopt.metrics import pair_metrics
    from prefopt.sft import sft_step
    from prefopt.step import _kto_metrics

    two = torch.zeros(2)
    out = LossOutput(two, two, two)
    paired = pair_metrics(out, PairLogps(two, two, two, two, two, two))
    unpaired = _kto_metrics(out, two, two, torch.tensor([True, False]), torch.zeros(()))

    def policy(*_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return two, torch.ones(2)

    rows = torch.zeros(2, 3)
    batch = SimpleNamespace(input_ids=rows, attention_mask=rows, response_mask=rows)
    sft = sft_step(policy, batch).metrics  # type: ignore[arg-type]
    assert set(EVAL_METRICS["paired"]) == set(paired)
    assert set(EVAL_METRICS["unpaired"]) == set(unpaired)
    assert set(EVAL_METRICS["sft"]) == set(sft)


def test_train_help_names_every_section_and_where_keys_are_documented(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from prefopt.cli import CONFIG_SECTIONS, main

    assert list(CONFIG_SECTIONS) == [f.name for f in dataclasses.fields(ExperimentConfig)]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert ", ".join(CONFIG_SECTIONS) in text
    assert "config.py" in text and "OUTPUT/config.yaml" in text


def test_every_section_has_a_docstring() -> None:
    """ExperimentConfig's own fields are documented like every other field."""
    import inspect

    source = inspect.getsource(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        assert re.search(rf"\n    {f.name}: .*\n    \"\"\"\S", source), f.name


def test_validate_catches_edits_made_after_loading() -> None:
    cfg = load_config()
    cfg.loss.beta = -1.0
    with pytest.raises(ConfigError, match="loss.beta"):
        cfg.validate()


# --- reference strategy resolution ----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "copy"),
        (["lora.enabled=true"], "adapter"),
        (["loss.name=simpo"], "none"),
        (["loss.name=[orpo,sft]"], "none"),
        (["loss.name=simpo", "lora.enabled=true"], "none"),
        (["reference.model=sft/model"], "model"),
        (["reference.model=sft/model", "lora.enabled=true"], "model"),
        (["loss.name=[sft,sigmoid]"], "copy"),  # any reference-based loss needs one
        (["loss.name=kto"], "copy"),
        (["reference.strategy=precompute"], "precompute"),  # explicit choices are kept
        (["reference.strategy=copy", "lora.enabled=true"], "copy"),
    ],
)
def test_reference_strategy_resolves_auto(overrides: list[str], expected: str) -> None:
    assert load_config(None, overrides).reference_strategy() == expected


def test_reference_strategy_on_dataclasses_directly() -> None:
    cfg = ExperimentConfig(loss=LossConfig(name="hinge"), reference=ReferenceConfig())
    assert cfg.reference_strategy() == "copy"


# --- saving ---------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "loss.name=[sigmoid,sft]",
            "loss.weights=[1,0.25]",
            "optim.lr=1e-6",
            "lora.enabled=true",
            "lora.target_modules=[q_proj,v_proj]",
            "data.columns.prompt=question",
            "output.resume=latest",
            "train.max_steps=3",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # Every field is written, so a saved run documents all its defaults.
    saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, section_type in typing.get_type_hints(ExperimentConfig).items():
        assert set(saved[name]) == {f.name for f in dataclasses.fields(section_type)}


def test_saved_defaults_round_trip(tmp_path: Path) -> None:
    save_config(ExperimentConfig(), tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == ExperimentConfig()


# --- the shipped example configs ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    CONFIG_FILES or [pytest.param(None, marks=pytest.mark.skip(reason="no configs/*.yaml yet"))],
    ids=[p.name for p in CONFIG_FILES] or None,
)
def test_example_config_loads(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    cfg.validate()
    assert cfg.reference_strategy() in ("copy", "model", "adapter", "precompute", "none")
    assert math.isfinite(cfg.optim.lr)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "sharded", "fused"),
    [([], False, True), ([], True, None), (["optim.fused=false"], False, None),
     (["optim.fused=true"], True, True)],
)  # fmt: skip
def test_adamw_is_fused_unless_sharded_or_told(
    override: list[str], sharded: bool, fused: bool | None
) -> None:
    """Fused AdamW by default (faster, no grouped temporaries); torch's default under sharding."""
    import torch

    from prefopt.run_setup import make_optimizer

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer(load_config(None, override), [param], sharded=sharded)
    assert optimizer.defaults["fused"] is fused
