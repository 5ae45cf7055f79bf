"""The example scripts in examples/, in their --fast form: they run, write their result files,
and show the qualitative effect each one is about; and README's library-API snippet runs."""

from __future__ import annotations

import importlib
import math
import re
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from toy import make_tokenizer
from toy_models import learnable_pairs, make_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SNIPPET_MODEL = '"bundled:smollm2-135m-instruct"'
SNIPPET_DATA = '"data/smollm2_chatterbot_vader.jsonl"'


def load(name: str) -> ModuleType:
    """Import examples/<name>.py (the scripts import their sibling `_common` by plain name)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def assert_results(out: Path) -> None:
    assert (out / "result.png").stat().st_size > 1000
    text = (out / "result.md").read_text(encoding="utf-8")
    assert text.startswith("# ") and "Command: `python examples/" in text and "| " in text


def test_dpo_vs_ipo_rejected_logp_keeps_falling_only_for_dpo(tmp_path: Path) -> None:
    runs = load("dpo_vs_ipo").main(["--fast", "--out", str(tmp_path)])
    assert_results(tmp_path)
    dpo = [r for r in runs if r.loss == "sigmoid"]
    ipo = [r for r in runs if r.loss == "ipo"]
    assert len(dpo) == len(ipo) == 2
    for r in dpo:  # every β: still going down over the last quarter of training
        assert r.rejected[-1] < r.rejected[0] - 2
        assert r.tail_change(r.rejected) < -0.1
    slowest_dpo = min(abs(r.tail_change(r.rejected)) for r in dpo)
    for r in ipo:  # levelled off, at the per-token margin 1/(2β) IPO regresses to
        assert abs(r.tail_change(r.rejected)) < 0.25 * slowest_dpo
        assert r.ratio_margin() == pytest.approx(1 / (2 * r.beta), abs=0.05)


def test_bradley_terry_recovers_order_and_unregularised_fit_widens(tmp_path: Path) -> None:
    module = load("bradley_terry_sim")
    rec, curves = module.main(["--fast", "--out", str(tmp_path)])
    assert_results(tmp_path)
    assert rec.spearman > 0.9
    assert rec.rmse < 0.4
    weakest = min(curves, key=lambda c: c.prior)
    true_spread = statistics.pstdev(module.true_strengths(module.FAST.models, 1.5).values())
    # More MM iterations (epochs) widen the gaps: monotone, and past the truth on small samples.
    assert all(b >= a - 1e-9 for a, b in zip(weakest.spread, weakest.spread[1:], strict=False))
    assert weakest.spread[-1] > true_spread
    # ... which is overfitting: the held-out excess loss ends above its minimum.
    assert weakest.excess[-1] > 1.5 * min(weakest.excess)


def test_beta_frontier_fast_runs_on_a_tiny_model(tmp_path: Path) -> None:
    points = load("beta_frontier").main(["--fast", "--out", str(tmp_path)])
    assert_results(tmp_path)
    assert [p.beta for p in points] == [0.1, 10.0]
    for p in points:
        assert math.isfinite(p.reward) and math.isfinite(p.kl.per_sequence)
        assert p.kl.num_samples == 16  # 8 prompts × 2 answers
        assert p.train_accuracy[-1] == 1.0
    small, large = points
    # A large β stops pushing once β·h saturates the sigmoid: the policy moves less.
    assert small.train_margins[-1] / small.beta > large.train_margins[-1] / large.beta
    assert small.kl.per_sequence > large.kl.per_sequence
    # Reward side: the length judge and the seeded sampling are deterministic, so the reference
    # (the same base, the same seeds) scores the same for every β. small.reward >= large.reward
    # is not asserted: on this tiny random model it is chance. A run gave 15.75 (β 0.1) vs 15.94
    # (β 10) words, while the standard error of a mean over the 16 answers was about 3.2 words.
    assert small.ref_reward == large.ref_reward


@pytest.mark.slow
def test_beta_frontier_on_the_bundled_model(tmp_path: Path) -> None:
    """One β, few steps and prompts on SmolLM2-135M with the VADER judge (minutes)."""
    pytest.importorskip("vaderSentiment")
    argv = ["--out", str(tmp_path), "--betas", "0.5", "--steps", "2", "--batch-size", "4",
            "--prompts", "4", "--samples", "1", "--max-new-tokens", "16"]  # fmt: skip
    (point,) = load("beta_frontier").main(argv)
    assert_results(tmp_path)
    assert -1.0 <= point.reward <= 1.0 and -1.0 <= point.ref_reward <= 1.0
    assert math.isfinite(point.kl.per_sequence)


def readme_library_snippet() -> str:
    """The python block between README's `<!-- library-snippet ... -->` markers."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"<!-- library-snippet\b.*?-->(.*?)<!-- /library-snippet -->", readme, re.S)
    assert section, "README.md lost its library-snippet markers"
    code = re.fullmatch(r"\s*```python\n(.*)```\s*", section.group(1), re.S)
    assert code, "the library snippet is not one python block"
    return code.group(1)


def test_readme_library_snippet_runs(tmp_path: Path) -> None:
    """README's snippet, as written, on a tiny Llama and 3 toy pairs (fewer than the 4 it
    slices): only the model and data paths are swapped. The tokenizer is saved without a pad
    token, as many are. Policy and reference load the same weights, so h = 0 and every loss is
    −log σ(0) = ln 2 = 0.6931471806, with gradients reaching the policy and not the reference
    (frozen: no graph is built for it)."""
    make_model("llama").save_pretrained(tmp_path / "model")
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", learnable_pairs(3))
    code = readme_library_snippet()
    for literal in (SNIPPET_MODEL, SNIPPET_DATA):
        assert code.count(literal) == 1, f"README snippet no longer loads {literal}"
    code = code.replace(SNIPPET_MODEL, repr(str(tmp_path / "model")))
    code = code.replace(SNIPPET_DATA, repr(str(data)))
    scope: dict[str, object] = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md:library-snippet", "exec"), scope)
    out, batch, policy = scope["out"], scope["batch"], scope["policy"]
    assert batch.num_pairs == 3  # type: ignore[attr-defined]
    assert scope["tokenizer"].pad_token_id == tokenizer.eos_token_id  # type: ignore[attr-defined]
    losses = out.losses  # type: ignore[attr-defined]
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)), rtol=0, atol=1e-5)
    grads = [p.grad for p in policy.parameters()]  # type: ignore[attr-defined]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    reference = scope["reference"]
    assert all(p.grad is None for p in reference.parameters())  # type: ignore[attr-defined]
    assert scope["ref_logps"].grad_fn is None  # type: ignore[attr-defined]
