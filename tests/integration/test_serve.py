"""Stage 5 on the session's local Ray cluster: the HTTP API over the tiny model.

Embeddings served through dynamic batching equal the in-process Embedder's; raw counts are
tokenized on the server exactly as the corpus tokenized the same cells; classifiers (a full
fine-tuned model and a LoRA adapter) are chosen per request; every bad request gets a 4xx
JSON error and the server keeps answering; bearer-token auth guards every route but /healthz
(/docs and /openapi.json included). Hardening: bodies over the limit are refused before they
are read, the symbol caches stay bounded, and large requests do not stall small ones.
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


# --- Hardening: every probe case of the security review gets a regression test. ----------


def _deep(depth: int) -> str:
    return '{"genes": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    ("route", "body", "status", "needle"),
    [
        ("/embed", {"input_ids": [2, 10**29, 3]}, 400, "input_ids[1]"),
        ("/embed", '{"input_ids": [2, ' + "9" * 300 + ", 3]}", 400, "input_ids[1]"),
        ("/embed", '{"input_ids": [2, ' + "9" * 5000 + ", 3]}", 400, "input_ids[1]"),
        ("/embed", '{"genes": {"CD3E": ' + "7" * 400 + "}}", 400, "genes"),
        ("/embed", '{"genes": {"CD3E": 1e400}}', 400, "genes"),
        ("/embed", '{"genes": {"CD3E": NaN}}', 400, "NaN"),
        ("/embed", _deep(100_000), 400, "nested"),
        ("/embed", "[" * 100_000 + "]" * 100_000, 400, "nested"),
        ("/embed", _deep(20), 400, "nested"),
        ("/classify", {"classifier": {"a": 1}, "input_ids": [2, 10, 3]}, 422, "classifier"),
        ("/classify", {"classifier": ["full"], "input_ids": [2, 10, 3]}, 422, "classifier"),
        ("/embed", {"genes": {"CD3E": 1.5, "CD19": 2}}, 422, "normalized"),
        ("/embed", {"genes": {"CD3E": 1e300, "CD19": 2}}, 422, "at most"),
        ("/embed", {"genes": {"CD3E": 1, "CD19": 2}, "normalized": "yes"}, 422, "normalized"),
        ("/embed", {"input_ids": [2, 10, 3], "normalized": True}, 422, "normalized"),
        ("/embed", {"genes": {"G" * 10_000: 1, "CD19": 2}}, 422, "characters"),
        ("/perturb", {"input_ids": [2, 10, 11, 3], "perturbations": [{"type": "delete", "genes": [{"a": 1}]}]}, 422, "genes"),
    ],
)  # fmt: skip
def test_probe_inputs_get_named_4xx(
    server: Any, route: str, body: Any, status: int, needle: str
) -> None:
    answer = post(server, route, body)
    assert answer.status_code == status, answer.text[:500]
    assert needle in answer.json()["error"], answer.text[:500]
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def _raw_request(
    server: Any, head: list[str], parts: list[bytes], wait_s: float = 20.0
) -> tuple[int, str]:
    """Send a request head and some body bytes over a plain socket (never the whole body a
    header may promise), then read the answer: ``(status, body text)``."""
    host, port = server.url.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        lines = [*head, f"Host: {host}:{port}", f"Authorization: Bearer {TOKEN}", "", ""]
        sock.sendall("\r\n".join(lines).encode())
        for part in parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            chunk = sock.recv(65536)  # socket.timeout here: the server waited for the body
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 62


def test_oversized_body_refused_from_its_content_length(server: Any) -> None:
    """A 300 MB Content-Length gets its 413 after 64 kB sent: the server reads no further."""
    head = ["POST /embed HTTP/1.1", "Content-Type: application/json",
            f"Content-Length: {300 * 1024**2}"]  # fmt: skip
    status, text = _raw_request(server, head, [b'{"genes": {"' + b"A" * 65536])
    assert status == 413 and "bytes" in json.loads(text)["error"], text
    # A Content-Length that is no number never reaches the API: the HTTP server refuses it.
    status, text = _raw_request(server, [*head[:2], "Content-Length: lots"], [b"{}"])
    assert status == 400, text
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_oversized_streamed_body_refused_while_streaming(server: Any) -> None:
    """A chunked body (no Content-Length) is cut off once it passes the limit."""
    chunk = b"A" * (1024**2)
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)]  # 6 MB, never finished
    head = ["POST /embed HTTP/1.1", "Content-Type: application/json", "Transfer-Encoding: chunked"]
    status, text = _raw_request(server, head, parts)
    assert status == 413 and "bytes" in json.loads(text)["error"], text
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def test_docs_and_openapi_need_the_token(server: Any) -> None:
    for route in ("/docs", "/openapi.json"):
        assert requests.get(f"{server.url}{route}", timeout=10).status_code == 401, route
        assert requests.get(f"{server.url}{route}", headers=AUTH, timeout=10).status_code == 200
    spec = requests.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()
    assert "/embed" in spec["paths"] and "/openapi.json" not in spec["paths"]
    assert requests.get(f"{server.url}/redoc", timeout=10).status_code in (401, 404)


def test_normalized_values_rank_like_raw_counts(server: Any, cells: list[dict[str, Any]]) -> None:
    """``normalized: true``: depth-normalised values (here CP10k of the cell's own total, sent
    without the unmappable rest) rank exactly as the raw counts with their total do."""
    cell = cells[3]
    n = sum(cell["genes"].values())
    cp10k = {g: c / n * 10_000 for g, c in cell["genes"].items() if g != "NOT_A_GENE_1"}
    raw = post(server, "/embed", {"genes": cell["genes"]}).json()
    norm = post(server, "/embed", {"genes": cp10k, "normalized": True})
    assert norm.status_code == 200, norm.text
    assert norm.json()["n_tokens"] == raw["n_tokens"]
    np.testing.assert_allclose(norm.json()["embedding"], raw["embedding"], rtol=1e-6, atol=1e-7)
    # Without the flag the same fractional values are refused, not ranked as counts.
    refused = post(server, "/embed", {"genes": cp10k})
    assert refused.status_code == 422 and "normalized" in refused.json()["error"]


def _api_handle(server: Any) -> Any:
    from ray import serve

    return serve.get_deployment_handle("Api", app_name=server.app_name)


def test_unknown_symbols_keep_the_cache_bounded(server: Any) -> None:
    """Many distinct unknown names (15k over 5 requests) leave the replica's symbol caches
    within their bounds; known symbols still resolve afterwards."""
    for r in range(5):
        junk = {f"NOPE{r}_{i}": 1 for i in range(3_000)}
        answer = post(server, "/embed", {"genes": junk})
        assert answer.status_code == 422, answer.text[:300]
    info = _api_handle(server).tokenizer_cache_info.remote().result()
    assert info["unresolved"] <= info["unresolved_max"] < 15_000, info
    assert info["resolved"] <= info["resolved_max"], info


@pytest.fixture(scope="module")
def symbols() -> list[str]:
    """40k distinct HGNC symbols of the shared gene table (the server's default table)."""
    from cellfoundry.genes import GeneTable

    names = [s for s in GeneTable.load().frame["symbol"].unique(maintain_order=True).to_list() if s]
    return names[:40_000]


def test_large_requests_do_not_stall_small_ones(
    server: Any, cells: list[dict[str, Any]], symbols: list[str]
) -> None:
    """While 4 clients keep sending 40k-symbol cells, a small cell's p50 latency stays
    bounded: parsing and tokenizing run in worker threads, large bodies in their own pool."""
    import statistics
    import threading
    import time

    big = json.dumps({"genes": {s: 1 + i % 7 for i, s in enumerate(symbols)}})
    small = {"genes": cells[2]["genes"]}
    assert post(server, "/embed", big).status_code == 200  # warms the symbol cache

    def timed() -> float:
        t0 = time.perf_counter()
        answer = post(server, "/embed", small)
        assert answer.status_code == 200, answer.text
        return time.perf_counter() - t0

    idle = statistics.median(timed() for _ in range(5))
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:
        while not stop.is_set():
            statuses.append(post(server, "/embed", big).status_code)

    with ThreadPoolExecutor(4) as pool:
        loaders = [pool.submit(load) for _ in range(4)]
        time.sleep(1.0)
        busy = [timed() for _ in range(10)]
        stop.set()
        for f in loaders:
            f.result()
    p50 = statistics.median(busy)
    print(f"small request p50: idle {idle * 1e3:.0f} ms, under load {p50 * 1e3:.0f} ms; "
          f"{len(statuses)} large requests")  # fmt: skip
    assert set(statuses) == {200}
    # Measured on the shared 2-core box: with tokenization on the event loop, p50 0.95 s
    # under load (every sample >= 0.72 s, idle 0.10 s); off it, 0.18 s and 0.36 s (idle 0.09 s).
    assert p50 < 0.6, (idle, busy)
