"""Held-out selection, deterministic masks, the rank baseline and the per-cell scores,
each against a small hand-computed case; the predictor with a real (tiny) BERT."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers

from cellfoundry.config import parse_config
from cellfoundry.config.evaluate import HoldoutConfig, MaskedEvalConfig
from cellfoundry.evaluate.masked_report import masked_metrics
from cellfoundry.evaluate.masking import (
    RankBaseline,
    gene_ranks,
    hash_fraction,
    mask_positions,
    select_cells,
    special_mask,
)
from cellfoundry.evaluate.predict import MaskedPredictor, resolve_device
from cellfoundry.evaluate.report import paired_difference, summarize

VOCAB = {
    "<pad>": 0,
    "<mask>": 1,
    "<cls>": 2,
    "<eos>": 3,
    **{f"ENSG{i:04d}": i for i in range(4, 20)},
}
SPECIAL = special_mask(VOCAB, 20)


def test_special_mask_marks_bracketed_tokens_and_unassigned_ids() -> None:
    assert SPECIAL[:4].all() and not SPECIAL[4:].any()
    partial = special_mask({"<pad>": 0, "<mask>": 1, "ENSG1": 3}, 5)
    assert partial.tolist() == [True, True, True, False, True]  # ids 2 and 4: no gene


def test_mask_positions_count_specials_and_determinism() -> None:
    row = np.array([2, *range(4, 18), 3])  # <cls>, 14 genes, <eos>
    pos = mask_positions(row, SPECIAL, fraction=0.15, seed=0, cell_id="a")
    assert len(pos) == 2  # round(0.15 * 14) = round(2.1)
    assert not SPECIAL[row[pos]].any() and (np.diff(pos) > 0).all()
    again = mask_positions(row, SPECIAL, fraction=0.15, seed=0, cell_id="a")
    np.testing.assert_array_equal(pos, again)
    draws = {
        tuple(mask_positions(row, SPECIAL, fraction=0.5, seed=s, cell_id="a")) for s in range(5)
    }
    assert len(draws) > 1  # the seed matters
    # at least one gene, and none for a cell of specials only
    assert (
        len(mask_positions(np.array([2, 7, 3]), SPECIAL, fraction=0.15, seed=0, cell_id="b")) == 1
    )
    assert mask_positions(np.array([2, 3]), SPECIAL, fraction=0.15, seed=0, cell_id="c").size == 0
    # 0.5 * 5 = 2.5 rounds half up to 3
    assert len(mask_positions(np.arange(4, 9), SPECIAL, fraction=0.5, seed=0, cell_id="d")) == 3


def test_gene_ranks_skip_specials() -> None:
    assert gene_ranks(np.array([2, 9, 5, 7, 3]), SPECIAL).tolist() == [-1, 0, 1, 2, -1]
    assert gene_ranks(np.array([9, 5]), SPECIAL).tolist() == [0, 1]  # V1: no <cls>


def test_rank_baseline_hand_case() -> None:
    baseline = RankBaseline(20, SPECIAL)
    baseline.update([np.array([2, 10, 11, 12, 3]), np.array([2, 10, 12, 11, 3])])
    baseline.update([np.array([2, 11, 10, 3])])  # a second shard
    baseline.fit()
    # rank 0: 10 x2, 11 x1 -> 10; rank 1: 11, 12, 10 once each -> lowest id 10;
    # rank 2: 12, 11 -> 11; beyond: the most frequent gene overall (10 and 11 x3) -> 10
    assert baseline.modes.tolist() == [10, 10, 11]
    assert baseline.predict(np.array([0, 1, 2, 3, 50])).tolist() == [10, 10, 11, 10, 10]
    assert baseline.n_cells == 3


def test_rank_baseline_without_training_cells_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="holdout"):
        RankBaseline(20, SPECIAL).fit()


def test_select_cells_column_hash_and_train_values() -> None:
    table = pa.table({"cell_id": ["a", "b", "c", "d"], "split": ["train", "test", None, "test"]})
    held, train = select_cells(table, HoldoutConfig())
    assert held.tolist() == [False, True, False, True]
    assert train.tolist() == [True, False, True, False]
    _, train = select_cells(table, HoldoutConfig(train_values=["train"]))
    assert train.tolist() == [True, False, False, False]
    held, train = select_cells(table, HoldoutConfig(mode="hash", fraction=0.5, seed=3))
    np.testing.assert_array_equal(held, hash_fraction(["a", "b", "c", "d"], 3) < 0.5)
    assert (held ^ train).all()
    with pytest.raises(ValueError, match=r"holdout\.column"):
        select_cells(table, HoldoutConfig(column="batch"))


def test_hash_fraction_is_uniform_and_deterministic() -> None:
    ids = [f"cell{i}" for i in range(4000)]
    frac = hash_fraction(ids, 0)
    assert 0.45 < frac.mean() < 0.55 and frac.min() >= 0.0 and frac.max() < 1.0
    np.testing.assert_array_equal(frac, hash_fraction(ids, 0))
    assert not np.array_equal(frac, hash_fraction(ids, 1))


def test_masked_metrics_hand_case() -> None:
    records = [
        {"n_masked": 4, "model_correct": 2, "baseline_correct": 1, "group": "x"},  # .5 vs .25
        {"n_masked": 2, "model_correct": 0, "baseline_correct": 1, "group": "y"},  # 0 vs .5
        {"n_masked": 4, "model_correct": 4, "baseline_correct": 0, "group": "x"},  # 1 vs 0
    ]
    m = masked_metrics(records)
    assert m["model"]["n"] == 3 and m["model"]["mean"] == pytest.approx(0.5)
    assert m["model"]["median"] == pytest.approx(0.5)
    assert m["baseline"]["mean"] == pytest.approx(0.25)
    d = m["difference"]  # per cell: +.25, -.5, +1
    assert d["mean"] == pytest.approx(0.25) and d["median"] == pytest.approx(0.25)
    assert (d["wins"], d["losses"], d["ties"]) == (2, 1, 0)
    assert m["pooled"] == {"n_masked_genes": 10, "model": 0.6, "baseline": 0.2}
    assert m["by_group"]["x"] == {"n": 2, "model_mean": 0.75, "baseline_mean": 0.125,
                                  "difference_mean": 0.625}  # fmt: skip


def test_summaries_and_paired_difference() -> None:
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0]))
    assert (s["n"], s["mean"], s["median"], s["min"], s["max"]) == (4, 2.5, 2.5, 1.0, 4.0)
    assert summarize(np.array([]))["mean"] is None
    d = paired_difference(np.array([0.5, 0.5]), np.array([0.5, 0.5]))
    assert d["ties"] == 2 and d["wilcoxon_p"] is None
    d = paired_difference(np.arange(20) / 20 + 0.1, np.arange(20) / 20)
    assert d["wins"] == 20 and d["wilcoxon_p"] < 0.001


def test_config_defaults_and_checks(tmp_path) -> None:
    cfg = parse_config(MaskedEvalConfig, {"model": str(tmp_path / "m"), "tokenized": "t"})
    assert cfg.output_dir == str(tmp_path / "m-eval-masked")
    with pytest.raises(ValueError, match="mask_fraction"):
        parse_config(MaskedEvalConfig, {"model": "m", "tokenized": "t", "mask_fraction": 1.5})
    with pytest.raises(ValueError, match="unknown key"):
        parse_config(MaskedEvalConfig, {"model": "m", "tokenized": "t", "holdout": {"colum": "x"}})


def _bert(seed: int = 0) -> transformers.BertForMaskedLM:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertForMaskedLM(config)


def test_predictor_chooses_gene_tokens_only() -> None:
    """A head biased towards <mask> (id 1), then gene 7: the guess is 7 at every position."""
    model = _bert()
    with torch.no_grad():
        model.cls.predictions.decoder.weight.zero_()
        model.cls.predictions.decoder.bias.zero_()
        model.cls.predictions.decoder.bias[1] = 100.0
        model.cls.predictions.decoder.bias[7] = 10.0
    predictor = MaskedPredictor(model, SPECIAL, pad_id=0, mask_id=1, device=torch.device("cpu"))
    rows = [np.array([2, 7, 8, 9, 3]), np.array([2, 5, 7, 3])]
    masks = [np.array([1, 3]), np.array([2])]
    out = predictor.predict(rows, masks)
    assert [o.tolist() for o in out] == [[7, 7], [7]]
    # scored: cell 1 has truths (7, 9) -> 1 of 2 correct; cell 2 truth 7 -> 1 of 1
    assert [(o == r[m]).mean() for o, r, m in zip(out, rows, masks, strict=True)] == [0.5, 1.0]


def test_predictor_results_do_not_depend_on_batching_or_padding() -> None:
    model = _bert(seed=1)
    predictor = MaskedPredictor(model, SPECIAL, pad_id=0, mask_id=1, device=torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = [np.array([2, *rng.choice(np.arange(4, 20), n, replace=False), 3]) for n in (3, 9, 14)]
    masks = [
        mask_positions(r, SPECIAL, fraction=0.3, seed=0, cell_id=str(i)) for i, r in enumerate(rows)
    ]
    together = predictor.predict(rows, masks)
    alone = [predictor.predict([r], [m])[0] for r, m in zip(rows, masks, strict=True)]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_array_equal(a, b)
    # and they equal a plain full forward pass with <mask> at the masked positions
    for row, pos, guess in zip(rows, masks, together, strict=True):
        ids = torch.tensor(row).clone()
        ids[pos] = 1
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0]
        logits[:, :4] = float("-inf")
        np.testing.assert_array_equal(logits.argmax(-1).numpy()[pos], guess)


def test_resolve_device_downgrades_bf16_on_cpu() -> None:
    with pytest.warns(UserWarning, match="fp32"):
        assert resolve_device("cpu", "bf16") == (torch.device("cpu"), None)
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), None)
    if not torch.cuda.is_available():
        assert resolve_device("auto", "auto") == (torch.device("cpu"), None)
        with pytest.raises(ValueError, match="device: auto or cpu"):
            resolve_device("cuda", "auto")


def test_run_masked_bad_paths_name_the_fix(tmp_path) -> None:
    from cellfoundry.evaluate.masked import run_masked

    cfg = parse_config(MaskedEvalConfig, {"model": str(tmp_path / "m"), "tokenized": str(tmp_path)})
    with pytest.raises(ValueError, match="cellfoundry pretrain"):
        run_masked(cfg)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    cfg = parse_config(
        MaskedEvalConfig, {"model": str(tmp_path / "m"), "tokenized": str(tmp_path / "t")}
    )
    with pytest.raises(ValueError, match="cellfoundry corpus"):
        run_masked(cfg)
