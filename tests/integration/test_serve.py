"""Stage 5 on the session's local Ray cluster: the HTTP API over the tiny model.

Embeddings served through dynamic batching equal the in-process Embedder's; raw counts are
tokenized on the server exactly as the corpus tokenized the same cells; classifiers (a full
fine-tuned model and a LoRA adapter) are chosen per request; every bad request gets a 4xx
JSON error and the server keeps answering; bearer-token auth guards every route but /healthz.
"""

from __future__ import annotations

import glob
import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import requests
import torch
import transformers

from cellfoundry.config import parse_config
from cellfoundry.config.serve import ServeJobConfig
from cellfoundry.infer.embed import Embedder
from cellfoundry.infer.perturb import Perturbation, perturb_cells

TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_CELLS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cells(pbmc_corpus: Any) -> list[dict[str, Any]]:
    """The first pbmc_facs cells as requests (Ensembl ID -> count, plus one unmappable name
    carrying the rest of the cell's total) with the corpus's tokens for them."""
    genes = pl.read_parquet(pbmc_corpus.cells / "genes.parquet")["ensembl_id"].to_list()
    raw = pl.read_parquet(sorted(glob.glob(str(pbmc_corpus.cells / "data" / "part-*.parquet")))[0])
    tokens = pq.read_table(
        sorted(glob.glob(str(pbmc_corpus.tokenized / "part-*.parquet")))[0]
    ).to_pylist()
    by_id = {r["cell_id"]: r["input_ids"] for r in tokens}
    out = []
    for row in raw.filter(pl.col("cell_id").is_in(list(by_id))).head(N_CELLS).iter_rows(named=True):
        request = {genes[g]: int(c) for g, c in zip(row["gene_ids"], row["counts"], strict=True)}
        rest = int(row["n_counts"]) - sum(request.values())
        if rest:
            request["NOT_A_GENE_1"] = rest  # counted in n, never tokenized
        out.append(
            {"cell_id": row["cell_id"], "genes": request, "input_ids": by_id[row["cell_id"]]}
        )
    assert len(out) == N_CELLS
    return out


@pytest.fixture(scope="module")
def classifiers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A full 3-class classifier and a LoRA adapter (with its head) over the tiny model."""
    import peft

    root = tmp_path_factory.mktemp("classifiers")
    labels = {0: "B cell", 1: "T cell", 2: "monocyte"}
    full = transformers.BertForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    full.save_pretrained(root / "full")
    base = transformers.BertForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value"],
                              modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS"),
    )  # fmt: skip
    with torch.no_grad():  # non-zero adapters so the adapter visibly changes the output
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(root / "lora")
    base.config.save_pretrained(root / "lora")  # the classifier config (labels) beside the adapter
    return {"full": root / "full", "lora": root / "lora"}


@pytest.fixture(scope="module")
def server(
    tiny_model: Path, pbmc_corpus: Any, classifiers: dict[str, Path], monkeypatch_module: Any
) -> Any:
    from ray import serve

    from cellfoundry.serve import run_serve

    monkeypatch_module.setenv("CF_TEST_TOKEN", TOKEN)
    cfg = parse_config(
        ServeJobConfig,
        {
            "model": str(tiny_model),
            "gene_medians": str(pbmc_corpus.vocabulary),
            "classifiers": {k: str(v) for k, v in classifiers.items()},
            "num_cpus": 0.5,
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "auth_token_env": "CF_TEST_TOKEN",
            "http": {"port": free_port()},
        },
    )
    handle = run_serve(cfg)
    yield handle
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def post(
    server: Any, route: str, body: Any, headers: dict[str, str] | None = None
) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(
        f"{server.url}{route}", data=data, headers=AUTH if headers is None else headers, timeout=60
    )


def test_server_tokenizes_like_the_corpus(
    server: Any, cells: list[dict[str, Any]], tiny_model: Path, pbmc_corpus: Any
) -> None:
    from cellfoundry.serve import CellTokenizer

    tok = CellTokenizer.for_model(tiny_model, gene_medians=str(pbmc_corpus.vocabulary))
    for cell in cells:
        ids, report = tok.tokenize(cell["genes"])
        assert ids.tolist() == cell["input_ids"], cell["cell_id"]
        assert report["unmapped"] == (["NOT_A_GENE_1"] if "NOT_A_GENE_1" in cell["genes"] else [])


def test_embed_batched_equals_direct(
    server: Any, cells: list[dict[str, Any]], tiny_model: Path
) -> None:
    with ThreadPoolExecutor(N_CELLS) as pool:  # concurrent requests share batches
        answers = list(pool.map(lambda c: post(server, "/embed", {"genes": c["genes"]}), cells))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    served = np.array([a.json()["embedding"] for a in answers], dtype=np.float32)
    direct = Embedder(tiny_model).embed_cells([np.asarray(c["input_ids"]) for c in cells])
    np.testing.assert_allclose(served, direct, rtol=1e-4, atol=1e-5)
    by_ids = post(server, "/embed", {"input_ids": cells[0]["input_ids"]}).json()["embedding"]
    np.testing.assert_allclose(by_ids, direct[0], rtol=1e-4, atol=1e-5)


def test_classify_full_and_lora(
    server: Any, cells: list[dict[str, Any]], classifiers: dict[str, Path]
) -> None:
    import peft

    ids = torch.tensor([cells[0]["input_ids"]])
    full = transformers.BertForSequenceClassification.from_pretrained(classifiers["full"]).eval()
    base = transformers.BertForSequenceClassification.from_pretrained(
        json.loads((classifiers["lora"] / "adapter_config.json").read_text())[
            "base_model_name_or_path"
        ],
        config=transformers.AutoConfig.from_pretrained(classifiers["lora"]),
    )
    lora = peft.PeftModel.from_pretrained(base, classifiers["lora"]).eval()
    for name, model in (("full", full), ("lora", lora)):
        with torch.no_grad():
            expected = torch.softmax(model(input_ids=ids).logits[0], -1).numpy()
        answer = post(server, "/classify", {"classifier": name, "genes": cells[0]["genes"]})
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["label"] == model.config.id2label[int(expected.argmax())]
        np.testing.assert_allclose(list(got["probabilities"].values()), expected, atol=1e-5)
    full_p = post(server, "/classify", {"classifier": "full", "genes": cells[0]["genes"]}).json()[
        "probabilities"
    ]
    lora_p = post(server, "/classify", {"classifier": "lora", "genes": cells[0]["genes"]}).json()[
        "probabilities"
    ]
    assert full_p != lora_p  # the adapter changes the model


def test_perturb_equals_direct(server: Any, cells: list[dict[str, Any]], tiny_model: Path) -> None:
    ids = np.asarray(cells[1]["input_ids"])
    vocab = {
        v: k for k, v in json.loads((tiny_model / "token_dictionary.json").read_text()).items()
    }
    g1, g2 = vocab[int(ids[1])], vocab[int(ids[5])]
    body = {
        "input_ids": ids.tolist(),
        "perturbations": [{"type": "delete", "genes": [g1]}, {"type": "activate", "genes": [g2]},
                          {"type": "overexpress", "genes": [g2, g1]}],
    }  # fmt: skip
    answer = post(server, "/perturb", body)
    assert answer.status_code == 200, answer.text
    got = answer.json()["results"]
    direct = perturb_cells(
        Embedder(tiny_model), [ids],
        [Perturbation("delete", (int(ids[1]),)), Perturbation("activate", (int(ids[5]),)),
         Perturbation("overexpress", (int(ids[5]), int(ids[1])))],
    ).to_pylist()  # fmt: skip
    assert [r["kind"] for r in got] == ["delete", "activate", "overexpress"]
    np.testing.assert_allclose(
        [r["cell_cos"] for r in got], [r["cell_cos"] for r in direct], atol=1e-5
    )


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/embed", "{not json", 400, "malformed JSON"),
        ("/embed", "[1, 2]", 400, "JSON object"),
        ("/embed", {"genes": {"CD3E": -4, "CD19": "x"}}, 422, "non-negative"),
        ("/embed", {"genes": {"NOT_A_GENE_1": 5, "ALSO_NOT_2": 9}}, 422, "map to the model's vocabulary"),
        ("/embed", {"genes": {f"G{i}": 1 for i in range(60_001)}}, 413, "at most"),
        ("/embed", {"input_ids": [2, 10**9]}, 422, "vocabulary"),
        ("/embed", {"genes": {"CD3E": 1}, "input_ids": [2, 3]}, 422, "exactly one"),
        ("/classify", {"classifier": "nope", "input_ids": [2, 10, 3]}, 404, "unknown classifier"),
        ("/perturb", {"input_ids": [2, 10, 11, 3], "perturbations": [{"type": "explode", "genes": ["x"]}]}, 422, "type"),
        ("/perturb", {"input_ids": [2, 10, 11, 3], "perturbations": [{"type": "delete", "genes": ["TP53_NOPE"]}]}, 422, "not in the model's vocabulary"),
    ],
)  # fmt: skip
def test_bad_requests_get_clear_4xx(
    server: Any, route: str, body: Any, status: int, needle: str
) -> None:
    answer = post(server, route, body)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # still up


def test_auth_and_health(server: Any, cells: list[dict[str, Any]]) -> None:
    assert (
        post(server, "/embed", {"input_ids": cells[0]["input_ids"]}, headers={}).status_code == 401
    )
    wrong = {"Authorization": "Bearer nope"}
    assert (
        post(server, "/embed", {"input_ids": cells[0]["input_ids"]}, headers=wrong).status_code
        == 401
    )
    health = requests.get(f"{server.url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["classifiers"] == ["full", "lora"]
    assert server.url.startswith("http://127.0.0.1:")


def test_int8_weights_embed_close_to_fp32(tiny_model: Path, cells: list[dict[str, Any]]) -> None:
    """bitsandbytes LLM.int8 weights (CPU backend) give nearly the fp32 embeddings."""
    from cellfoundry.serve.loading import load_encoder

    seqs = [np.asarray(c["input_ids"]) for c in cells]
    fp32 = Embedder(tiny_model).embed_cells(seqs)
    model = load_encoder(tiny_model, "int8", torch.device("cpu"))
    assert any("Linear8bitLt" in type(m).__name__ for m in model.modules())
    int8 = Embedder(model).embed_cells(seqs)
    cos = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cos.min() > 0.98, cos
