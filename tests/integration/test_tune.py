"""Stage 3 on real PBMC labels and a local Ray cluster.

- ``cellfoundry finetune`` (one Ray task) on pbmc_facs's 10 FACS-sorted types and its own
  ``split`` column: the tiny random-init model beats the majority-class rate, the baselines
  sit beside it in the report, the saved model reloads (fp32 and 8-bit) and predicts alike.
- QLoRA on CPU: only adapter (and head) weights change; the adapter reloads onto the base.
- Gene classification runs with token labels and scores held-out genes only.
- ``run_tune``: 4 HyperOpt trials with ASHA, interrupted after 2, restored to the end.
- ``run_probe``: the frozen-encoder probe vs the saved fine-tuned model vs a baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cellfoundry import cli
from cellfoundry.config import FinetuneJobConfig, ProbeConfig, TuneJobConfig, parse_config
from cellfoundry.tune import (
    build_classifier,
    evaluate,
    load_finetuned,
    prepare,
    task_data,
    train_classifier,
)
from cellfoundry.tune.models import save_finetuned, trainable_state


def _base(pbmc_corpus: Any, tiny_model: Path, **changes: Any) -> dict[str, Any]:
    cfg = {
        "data": {"tokenized": str(pbmc_corpus.tokenized), "cells": str(pbmc_corpus.cells),
                 "dataset_ids": ["pbmc_facs"], "batch_size": 32, "max_train_cells": 1000},
        "split": {"column": "split", "validation_size": 0.1},
        "model": {"model_dir": str(tiny_model), "mode": "full"},
        "optim": {"learning_rate": 0.002, "num_train_epochs": 3, "warmup_ratio": 0.1},
        "baselines": {"methods": ["logreg", "random_forest", "svm"], "n_top_genes": 500},
        "scaling": {"resources_per_worker": {"CPU": 1}},
    }  # fmt: skip
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            cfg.setdefault(section, {})[leaf] = value
        else:
            cfg[section] = value
    return cfg


@pytest.fixture(scope="module")
def finetuned(pbmc_corpus: Any, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cellfoundry finetune --config FILE`` on pbmc_facs (full fine-tuning, 3 baselines)."""
    root = tmp_path_factory.mktemp("finetune")
    config = root / "finetune.yaml"
    config.write_text(
        yaml.safe_dump({**_base(pbmc_corpus, tiny_model), "output_dir": str(root / "out")})
    )
    assert cli.main(["finetune", "--config", str(config)]) == 0
    return root / "out"


def test_finetune_beats_majority_with_baselines_side_by_side(finetuned: Path) -> None:
    metrics = json.loads((finetuned / "metrics.json").read_text())
    summary, majority = metrics["summary"], metrics["majority_class_rate"]["split"]
    assert 0.1 < majority < 0.35  # pbmc_facs test: 97 cells of 10 types
    assert summary["full"]["accuracy"] > majority + 0.05, summary
    for name in ("logreg", "random_forest", "svm"):
        assert summary[name]["accuracy"] > majority, (name, summary)
        assert 0.5 < summary[name]["roc_auc_ovr"] <= 1.0
    test = metrics["results"]["split"]["full"]["test"]
    assert test["n"] == metrics["splits"]["split"]["test"] == 97
    assert len(test["per_class"]) == len(metrics["label_names"]) == 10
    assert np.asarray(test["confusion_matrix"]).sum() == 97
    report = (finetuned / "report.md").read_text()
    for title in (
        "fine-tuned (full)",
        "logistic regression",
        "random forest",
        "linear SVM",
        "majority",
    ):
        assert title in report
    for name in ("confusion_matrix.png", "roc.png", "manifest.json", "model/config.json"):
        assert (finetuned / name).stat().st_size > 0, name
    mapping = json.loads((finetuned / "label_mapping.json").read_text())
    assert mapping["id2label"]["0"] == metrics["label_names"][0]
    splits = json.loads((finetuned / "splits.json").read_text())["split"]
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(
        splits["test"]
    )
    assert all(":" in c and c.startswith("pbmc_facs:") for c in splits["test"])


def test_finetuned_model_reloads_fp32_and_8bit(
    finetuned: Path, pbmc_corpus: Any, tiny_model: Path
) -> None:
    cfg = parse_config(FinetuneJobConfig, _base(pbmc_corpus, tiny_model))
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    device = torch.device("cpu")
    fp32 = evaluate(load_finetuned(finetuned), data, "test", 32, device)
    saved = json.loads((finetuned / "metrics.json").read_text())["results"]["split"]["full"]["test"]
    assert fp32["accuracy"] == pytest.approx(saved["accuracy"])
    int8_model = load_finetuned(finetuned, load_in_8bit=True)
    assert "Linear8bitLt" in type(int8_model.bert.encoder.layer[0].attention.self.query).__name__
    int8 = evaluate(int8_model, data, "test", 32, device)
    agree = np.mean(int8["scores"].argmax(1) == fp32["scores"].argmax(1))
    assert agree >= 0.9, agree


def test_finetune_rerun_reuses_the_artifact(
    finetuned: Path, pbmc_corpus: Any, tiny_model: Path
) -> None:
    from cellfoundry.tune import run_finetune

    cfg = parse_config(
        FinetuneJobConfig, {**_base(pbmc_corpus, tiny_model), "output_dir": str(finetuned)}
    )
    assert run_finetune(cfg)["reused"] is True


def _dequantized_4bit(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            data, state = module.weight.data, module.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):
                data, state = _convert_weight_packed_for_cpu_inverse(
                    data.clone(), copy.deepcopy(state)
                )
            out[name] = bnb.functional.dequantize_4bit(data, state).clone()
    assert out, "no 4-bit layers"
    return out


def test_qlora_trains_adapters_only_and_reloads(
    pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    cfg = parse_config(FinetuneJobConfig, _base(pbmc_corpus, tiny_model, model__mode="qlora",
                       optim={"learning_rate": 0.005, "num_train_epochs": 1, "max_steps_per_epoch": 4}))  # fmt: skip
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    model = build_classifier(
        cfg.model, task="cell", label_names=prep.label_names, seed=0, on_gpu=False
    )
    assert (
        "Linear4bit"
        in type(
            model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
        ).__name__
    )
    plain = {
        n: t.detach().clone()
        for n, t in model.named_parameters()
        if not t.requires_grad and t.is_floating_point()
    }
    base4 = _dequantized_4bit(model)
    before = trainable_state(model)
    assert all("lora_" in n or "modules_to_save" in n for n in before)
    assert cfg.model.lora.r is None and model.peft_config["default"].r == 32  # the seeds' default
    model, _ = train_classifier(cfg, data, model, torch.device("cpu"))
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "classifier" in n)
    for name, value in model.named_parameters():
        if name in plain:  # embeddings, LayerNorms, the original head: bit for bit
            assert torch.equal(plain[name], value), f"{name} changed"
    # 4-bit weights: bitsandbytes' CPU kernel repacks them (re-quantizing absmax) on the first
    # eval forward, so compare dequantized values to that rounding (an Adam step is ~lr = 5e-3)
    for name, value in _dequantized_4bit(model).items():
        torch.testing.assert_close(value, base4[name], atol=1e-3, rtol=0)
    out = save_finetuned(model, tmp_path / "q", mode="qlora", task="cell", label_names=prep.label_names,
                         base_model=cfg.model.model_dir)  # fmt: skip
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (
        out / "model"
    ).exists()
    adapter_bytes = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tiny_model / "model.safetensors").stat().st_size
    first = evaluate(model, data, "test", 32, torch.device("cpu"))["scores"]
    again = evaluate(load_finetuned(out), data, "test", 32, torch.device("cpu"))["scores"]
    np.testing.assert_allclose(again, first, atol=1e-5)


def test_gene_classification_scores_held_out_genes(pbmc_corpus: Any, tiny_model: Path) -> None:
    vocab = json.loads((tiny_model / "token_dictionary.json").read_text())
    genes = sorted(k for k in vocab if k.startswith("ENSG"))[:400]
    labels = {"a": genes[::2], "b": genes[1::2]}
    cfg = parse_config(FinetuneJobConfig, _base(
        pbmc_corpus, tiny_model, task={"kind": "gene", "gene_labels": labels},
        split={"test_size": 0.3, "validation_size": 0.2}, baselines={"methods": []},
        optim={"learning_rate": 0.002, "num_train_epochs": 1, "max_steps_per_epoch": 3},
        data={"tokenized": str(pbmc_corpus.tokenized), "dataset_ids": ["pbmc_facs"], "batch_size": 16},
    ))  # fmt: skip
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    assert not set(data.gene_classes["train"]) & set(data.gene_classes["test"])
    model = build_classifier(
        cfg.model, task="gene", label_names=prep.label_names, seed=0, on_gpu=False
    )
    model, last = train_classifier(cfg, data, model, torch.device("cpu"))
    test = evaluate(model, data, "test", 16, torch.device("cpu"))
    test_tokens = np.concatenate([t for t in data.cells.tokens])
    expected = np.isin(test_tokens, list(data.gene_classes["test"])).sum()
    assert test["n"] == expected > 0 and 0.0 <= test["macro_f1"] <= 1.0
    assert np.isfinite(last["train_loss"])


def test_tune_interrupted_then_restored(pbmc_corpus: Any, tiny_model: Path, tmp_path: Path) -> None:
    from cellfoundry.tune.search import run_tune

    base = _base(
        pbmc_corpus, tiny_model, data__max_train_cells=160,
        split={"column": "split", "validation_size": 0.05},
        baselines={"methods": ["logreg"], "n_top_genes": 200},
        optim={"learning_rate": 0.002, "num_train_epochs": 2},
    )  # fmt: skip
    data = {
        "finetune": base,
        "space": {"optim.learning_rate": {"loguniform": [1.0e-4, 5.0e-3]},
                  "optim.lr_scheduler_type": {"choice": ["linear", "cosine"]},
                  "optim.warmup_ratio": {"uniform": [0.0, 0.2]}, "model.dropout": {"uniform": [0.0, 0.2]},
                  "optim.max_grad_norm": {"uniform": [0.5, 2.0]}, "optim.weight_decay": {"uniform": [0.0, 0.3]},
                  "seed": {"randint": [0, 100]}},
        "tune": {"num_samples": 4, "max_concurrent_trials": 2},
        "search": {"n_initial_points": 2},
        "run": {"name": "search", "storage_path": str(tmp_path / "runs")},
        "output_dir": str(tmp_path / "best"),
    }  # fmt: skip
    first = run_tune(parse_config(TuneJobConfig, {**data, "interrupt_after_trials": 2}))
    assert first["completed"] is False and 2 <= first["finished_trials"] < 4
    assert not (tmp_path / "best").exists()
    done_first = {t["trial_id"] for t in first["trials"] if t["status"] == "TERMINATED"}
    second = run_tune(parse_config(TuneJobConfig, data))
    assert second["completed"] is True and second["finished_trials"] == 4
    assert len(second["trials"]) == 4 and done_first <= {t["trial_id"] for t in second["trials"]}
    assert all(1 <= t["epochs"] <= 2 for t in second["trials"])
    best = tmp_path / "best"
    metrics = json.loads((best / "metrics.json").read_text())
    assert metrics["search"]["best_params"]["optim"]["lr_scheduler_type"] in ("linear", "cosine")
    assert (best / "model" / "model.safetensors").is_file() and "logreg" in metrics["summary"]
    assert run_tune(parse_config(TuneJobConfig, data))["reused"] is True


def test_probe_report_compares_probe_finetuned_and_baselines(
    finetuned: Path, pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    from cellfoundry.evaluate.probe import run_probe

    base = _base(pbmc_corpus, tiny_model, baselines={"methods": ["logreg"], "n_top_genes": 500})
    cfg = parse_config(ProbeConfig, {"finetune": base, "output_dir": str(tmp_path / "probe"),
                                     "methods": ["probe", "full"], "finetuned_dir": str(finetuned)})  # fmt: skip
    report = run_probe(cfg)
    saved = json.loads((finetuned / "metrics.json").read_text())["summary"]["full"]
    assert report["summary"]["full"]["accuracy"] == pytest.approx(saved["accuracy"])
    assert set(report["summary"]) == {"probe", "full", "logreg", "majority_class"}
    assert 0.0 <= report["summary"]["probe"]["macro_f1"] <= 1.0
    for name in ("probe_report.json", "probe_report.md", "confusion_matrix.png", "roc.png"):
        assert (tmp_path / "probe" / name).stat().st_size > 0
    other = parse_config(ProbeConfig, {**cfg.__dict__, "finetune": _base(pbmc_corpus, tiny_model, split={"test_size": 0.2}),
                                       "output_dir": str(tmp_path / "p2"), "finetuned_dir": str(finetuned)})  # fmt: skip
    with pytest.raises(ValueError, match="other cells"):
        run_probe(other)


def test_few_shot_takes_n_training_cells_per_class(pbmc_corpus: Any, tiny_model: Path) -> None:
    cfg = parse_config(FinetuneJobConfig, _base(pbmc_corpus, tiny_model, data__few_shot=5))
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    counts = np.bincount(prep.cells.labels[data.train_rows], minlength=len(prep.label_names))
    assert counts.tolist() == [5] * 10
    assert set(data.train_rows) <= set(prep.splits[0].train)
    assert np.array_equal(data.eval_rows["test"], prep.splits[0].test)  # test unchanged


@pytest.mark.gpu
def test_qlora_on_gpu_trains_adapters_and_reloads(
    pbmc_corpus: Any, tiny_model: Path, tmp_path: Path
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = parse_config(FinetuneJobConfig, _base(pbmc_corpus, tiny_model, model__mode="qlora",
                       scaling={"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}},
                       optim={"learning_rate": 0.005, "num_train_epochs": 1, "max_steps_per_epoch": 4}))  # fmt: skip
    prep = prepare(cfg)
    data = task_data(cfg, prep, prep.splits[0])
    device = torch.device("cuda")
    model = build_classifier(
        cfg.model, task="cell", label_names=prep.label_names, seed=0, on_gpu=True
    )
    before = trainable_state(model)
    model, _ = train_classifier(cfg, data, model, device)
    after = trainable_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    out = save_finetuned(model, tmp_path / "q", mode="qlora", task="cell", label_names=prep.label_names,
                         base_model=cfg.model.model_dir)  # fmt: skip
    first = evaluate(model, data, "test", 32, device)["scores"]
    again = evaluate(load_finetuned(out, on_gpu=True), data, "test", 32, device)["scores"]
    np.testing.assert_allclose(again, first, atol=1e-3)


def test_linear_probe_saves_and_reloads(pbmc_corpus: Any, tiny_model: Path, tmp_path: Path) -> None:
    from cellfoundry.tune import compare

    cfg = parse_config(FinetuneJobConfig, _base(pbmc_corpus, tiny_model, model__mode="probe",
                                                data__max_train_cells=300, baselines={"methods": []}))  # fmt: skip
    prep = prepare(cfg)
    comparison = compare(cfg, ["probe"], prep=prep)
    probe = comparison.models["probe"]
    assert not any(p.requires_grad for p in probe.parameters())  # frozen encoder, fitted head
    out = save_finetuned(probe, tmp_path / "p", mode="probe", task="cell", label_names=prep.label_names,
                         base_model=cfg.model.model_dir)  # fmt: skip
    assert (out / "probe" / "probe.safetensors").stat().st_size < (
        tiny_model / "model.safetensors"
    ).stat().st_size
    data = task_data(cfg, prep, prep.splits[0])
    again = evaluate(load_finetuned(out), data, "test", 32, torch.device("cpu"))
    result = comparison.results["split"]["probe"]
    np.testing.assert_allclose(again["scores"], result.scores, atol=1e-5)
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])
