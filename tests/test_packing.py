"""`train.packing`: several pairs in one shared-prefix row, each with its own positions and
attention block. Checked by hand on literal ids, against unpacked and two-pass scoring on tiny
Llama, Qwen2 and GPT-2 models (log-probs and gradients), and in training (5 steps equal the
unpacked run, fp32 1e-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prefopt.config_io import load_config
from prefopt.errors import ConfigError
from prefopt.prefix_collate import _shared_mask, collate_shared_prefix, pack_rows
from prefopt.prefix_sharing import shared_prefix_logps
from prefopt.tokenize import TokenizedPair, tokenize_pairs
from prefopt.trainer import TrainResult, train
from test_prefix_sharing import (
    FAMILIES,
    IMPLEMENTATIONS,
    assert_same_grads,
    model,
    param_grads,
    two_pass,
    weighted,
)
from toy import make_tokenizer, toy_pairs
from toy_models import learnable_pairs, save_toy_model, train_lines, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# Lengths 6, 3, 3: with rows as wide as the longest (6), pairs 1 and 2 share row 1.
HAND = [
    TokenizedPair(7, prompt_ids=(10, 11, 12), chosen_ids=(20, 21), rejected_ids=(30,)),
    TokenizedPair(8, prompt_ids=(13,), chosen_ids=(22,), rejected_ids=(31,)),
    TokenizedPair(9, prompt_ids=(14,), chosen_ids=(23,), rejected_ids=(33,)),
]


def test_pack_rows_first_fit_in_order() -> None:
    assert pack_rows([6, 3, 3], 6) == [[0], [1, 2]]
    assert pack_rows([2, 5, 3, 1, 4], 5) == [[0, 2], [1], [3, 4]]
    assert pack_rows([7, 2], 5) == [[0], [1]]  # an oversized pair gets a row of its own
    assert pack_rows([4, 4], 4) == [[0], [1]]


def test_packed_layout_by_hand() -> None:
    batch = collate_shared_prefix(HAND, pad_token_id=99, pack=True)
    assert batch.input_ids.tolist() == [[10, 11, 12, 20, 21, 30], [13, 22, 31, 14, 23, 33]]
    # Each pair's positions restart at 0; rejected restarts after its own prompt.
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 1, 0, 1, 1]]
    assert batch.pair_rows.tolist() == [0, 1, 1]
    # (pair, source in the pair's row, target), ordered by pair.
    assert batch.chosen_index.tolist() == [[0, 0, 1, 2], [2, 3, 0, 3], [20, 21, 22, 23]]
    assert batch.rejected_index.tolist() == [[0, 1, 2], [2, 0, 3], [30, 31, 33]]
    assert batch.num_pairs == 3 and batch.num_tokens == 12
    assert batch.pair_tokens == 12 + 3 + 1 + 1  # each prompt counted twice
    allowed = (batch.attention_mask_4d[1, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],  # pair 1's rejected: its prompt, not its chosen
        [0, 0, 0, 1, 0, 0],  # pair 2 starts: nothing of pair 1
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 0, 1],
    ]
    unpacked = collate_shared_prefix(HAND, pad_token_id=99)
    assert unpacked.input_ids.shape == (3, 6) and unpacked.pair_rows.tolist() == [0, 1, 2]


def test_one_pair_per_row_needs_no_slot_comparison() -> None:
    """Unpacked rows (prompt 0, chosen 1, rejected 2, pad -1) hold one pair each, so the mask
    skips the pair-slot comparison: it is the mask with the comparison. A packed collation
    that could not pack (pairs as long as the widest) gives the unpacked batch's mask."""
    segment = torch.tensor([[0, 0, 1, 2, 2, -1], [0, 1, 1, 2, -1, -1]])  # [R, T]
    slot = torch.tensor([[0, 0, 0, 0, 0, -1], [1, 1, 1, 1, -1, -1]])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(_shared_mask(segment, None, dtype), _shared_mask(segment, slot, dtype))
    same_length = [HAND[0], TokenizedPair(3, (15, 16), (24,), (34, 35, 36))]  # 6 tokens each
    packed = collate_shared_prefix(same_length, pad_token_id=99, pack=True)
    unpacked = collate_shared_prefix(same_length, pad_token_id=99)
    assert packed.pair_rows.tolist() == [0, 1]
    assert torch.equal(packed.attention_mask_4d, unpacked.attention_mask_4d)


def toy_rows() -> list[TokenizedPair]:
    """The toy pairs after one as long as the first two together, so those two share a row."""
    rows, _ = tokenize_pairs(toy_pairs(), make_tokenizer(), max_length=128)
    a, b = rows[0], rows[1]
    long = TokenizedPair(
        99,
        a.prompt_ids + b.prompt_ids,
        a.chosen_ids + b.chosen_ids,
        a.rejected_ids + b.rejected_ids,
    )
    return [long, *rows]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_unpacked_and_two_pass(family: str, impl: str) -> None:
    m, rows = model(family, impl), toy_rows()
    packed = collate_shared_prefix(rows, pad_token_id=0, pack=True)
    assert packed.input_ids.shape[0] < len(rows), "the toy pairs should share a row"
    got = shared_prefix_logps(m, packed, chunk_size=5)
    want = two_pass(m, rows)
    unpacked = shared_prefix_logps(m, collate_shared_prefix(rows, pad_token_id=0), chunk_size=5)
    for g, w, u in zip(got[:2], want[:2], unpacked[:2], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        torch.testing.assert_close(g, u, rtol=0, atol=1e-5)
    assert got[2].tolist() == want[2].tolist() and got[3].tolist() == want[3].tolist()
    assert_same_grads(param_grads(m, weighted(got[0], got[1])), param_grads(m, weighted(*want[:2])))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Short pairs mixed with long-response ones, so unsorted batches have padding to fill."""
    root = tmp_path_factory.mktemp("packing")
    long_rows = [
        {
            "prompt": [{"role": "user", "content": "tell me about the cat"}],
            "chosen": [{"role": "assistant", "content": "the cat is good and nice . " * 4}],
            "rejected": [{"role": "assistant", "content": "the cat is bad and rude . " * 4}],
        }
        for _ in range(6)
    ]
    mixed = learnable_pairs(18, seed=0) + long_rows
    return {
        "model": save_toy_model(root / "model", "llama", seed=0),
        "train": write_jsonl(root / "train.jsonl", mixed),
        "eval": write_jsonl(root / "eval.jsonl", learnable_pairs(4, seed=1) + long_rows[:2]),
    }


def run(assets: dict[str, Path], out: Path, *extra: str) -> TrainResult:
    return train(
        load_config(
            None,
            [
                f"model.name_or_path={assets['model']}",
                f"data.train={assets['train']}",
                f"data.eval={assets['eval']}",
                f"output.dir={out}",
                "optim.lr=1e-3",
                "optim.warmup_ratio=0",
                "train.batch_size=6",
                "train.max_steps=5",
                "train.group_by_length=false",  # mixed lengths in each batch
                "train.prefix_sharing=true",
                "output.progress=false",
                *extra,
            ],
        )
    )


def test_packed_training_equals_unpacked_for_five_steps(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefopt.evaluation as evaluation

    rows_seen: list[tuple[int, int]] = []
    real = evaluation.collate_shared_prefix

    def spy(pairs: Any, **kwargs: Any) -> Any:
        batch = real(pairs, **kwargs)
        rows_seen.append((batch.input_ids.shape[0], batch.num_pairs))
        return batch

    monkeypatch.setattr(evaluation, "collate_shared_prefix", spy)
    packed = run(assets, tmp_path / "packed")  # train.packing=auto: on with prefix sharing
    assert any(r < n for r, n in rows_seen), f"no batch was packed: {rows_seen}"
    plain = run(assets, tmp_path / "plain", "train.packing=false")
    a, b = train_lines(tmp_path / "packed"), train_lines(tmp_path / "plain")
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4), (ra["step"], key)
    assert packed.final_eval is not None and plain.final_eval is not None
    assert packed.final_eval["loss"] == pytest.approx(plain.final_eval["loss"], abs=1e-4)
    assert packed.state.tokens_seen == plain.state.tokens_seen


def test_packing_true_turns_auto_prefix_sharing_on() -> None:
    """Short prompts: auto alone leaves sharing off; train.packing=true asks for it."""
    from prefopt.prefix_choice import choose_prefix_sharing
    from toy_models import make_model

    m = make_model("llama")
    short = [TokenizedPair(0, (1, 2), (3, 4, 5, 6), (7, 8, 9, 10))]
    assert not choose_prefix_sharing("auto", m, short, paired=True).enabled
    assert choose_prefix_sharing("auto", m, short, paired=True, packing=True).enabled


def test_packing_needs_prefix_sharing(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prefopt.prefix_choice as prefix_choice

    with pytest.raises(ConfigError, match="train.packing=true packs shared-prefix rows"):
        load_config(None, ["train.packing=true", "train.prefix_sharing=false"])
    # A model whose attention cannot take the 4-D mask (sliding window, flash, ALiBi...).
    monkeypatch.setattr(prefix_choice, "supports_shared_prefix", lambda m: (False, "no 4-D mask"))
    with pytest.raises(ConfigError, match="needs prefix sharing, which is off here.*4-D mask"):
        run(assets, tmp_path / "x", "train.packing=true", "train.prefix_sharing=auto")
