"""The Ray Serve application: an HTTP ingress in front of batched model replicas.

Routes: ``GET /healthz``; ``POST /embed`` (a cell -> its embedding); ``POST /classify``
(a cell -> class probabilities from a named fine-tuned classifier or LoRA adapter,
multiplexed over replicas); ``POST /perturb`` (a cell and a few perturbations -> shifts);
``GET /docs`` and ``/openapi.json``. With a token configured, every route but ``/healthz``
needs ``Authorization: Bearer <token>``.

A cell is ``{"genes": {gene: raw count}}`` (Ensembl IDs or symbols, tokenized on the server
with the model's own dictionaries; ``"normalized": true`` for depth-normalised values, see
:mod:`cellfoundry.serve.tokenizer`) or ``{"input_ids": [...]}``. Every bad request gets a 4xx
JSON body ``{"error": ..., ...details}``: 400 for a body that is not acceptable JSON (see
:mod:`cellfoundry.serve.body`), 401 without the token, 404 for an unknown classifier, 413
for too much (body bytes, checked before reading; genes; tokens; perturbations), 422 for
values the API cannot use. Bodies are parsed and tokenized in worker threads, small and
large ones in separate pools, so one client's large cells cannot stall the event loop or
other clients' small requests; nothing a request sends takes a replica down.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type.
import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from ray import serve

from cellfoundry import artifacts, storage
from cellfoundry.config import config_to_dict, parse_config
from cellfoundry.config.serve import ServeJobConfig
from cellfoundry.serve.body import parse_json, read_body
from cellfoundry.serve.errors import RequestError, guard
from cellfoundry.serve.listen import bind_replica_grpc_to_node_ip
from cellfoundry.serve.tokenizer import CellTokenizer

logger = logging.getLogger(__name__)

# FastAPI's own /docs, /redoc and /openapi.json would answer without the token: the Api class
# serves /docs and /openapi.json itself, behind the token when one is set.
api = FastAPI(
    title="cellfoundry", description=__doc__, docs_url=None, redoc_url=None, openapi_url=None
)
T = TypeVar("T")


@serve.deployment
class CellModel:
    """A model replica: cell embeddings and perturbations with dynamic batching."""

    def __init__(self, config: dict[str, Any]) -> None:
        bind_replica_grpc_to_node_ip()  # before Serve opens this replica's gRPC port
        from cellfoundry.infer.embed import Embedder
        from cellfoundry.serve.loading import load_encoder, serving_device

        cfg = parse_config(ServeJobConfig, config)
        device = serving_device(cfg.num_gpus)
        model = load_encoder(cfg.model, cfg.precision, device)
        self.embedder = Embedder(
            model, layer=cfg.layer, pooling=cfg.pooling,
            batch_size=cfg.batching.max_batch_size, token_dictionary=_vocab(cfg.model),
        )  # fmt: skip
        self.embed.set_max_batch_size(cfg.batching.max_batch_size)
        self.embed.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, cells: list[np.ndarray]) -> list[list[float]]:
        """Embeddings of the cells of concurrent requests, in one length-sorted pass."""
        return [row.tolist() for row in self.embedder.embed_cells(cells)]

    async def perturb(
        self, cell: np.ndarray, perturbations: list[tuple[str, list[int]]], fraction: float
    ) -> list[dict[str, Any]]:
        """Shifts of one cell under each perturbation, all in one batched pass: cell cosine
        (Geneformer's metric: ``<cls>`` on V2 models, the mean gene cosine on V1; ``metric``
        and ``emb_layer`` say so in each result) and, for the genes left, the mean / min
        cosine of their contextual embeddings."""
        from cellfoundry.infer.perturb import Perturbation, perturb_cells

        perts = [Perturbation(kind, tuple(tokens)) for kind, tokens in perturbations]  # type: ignore[arg-type]
        e = self.embedder
        # Geneformer's metric; input_ids without a leading <cls> on a V2 model have no <cls>
        # state to compare: pooled cosines then, and each result says which metric it is
        metric = "geneformer" if e.cls_id is None or cell[0] == e.cls_id else "pooled"
        table = perturb_cells(e, [cell], perts, fraction=fraction, gene_shifts=True, metric=metric)
        out = []
        for row in table.to_pylist():
            gene_cos = np.asarray(row["gene_cos"], dtype=np.float64)
            cos = row["cell_cos"]
            cos = None if cos is None or np.isnan(cos) else cos  # V1, no gene left: no shift
            out.append({
                "perturbation": row["perturbation"], "kind": row["kind"], "cell_cos": cos,
                "cell_shift": None if cos is None else 1.0 - cos, "n_genes": row["n_genes"],
                "gene_cos_mean": float(gene_cos.mean()) if len(gene_cos) else None,
                "gene_cos_min": float(gene_cos.min()) if len(gene_cos) else None,
                "metric": metric, "layer": e.layer, "emb_layer": e.emb_layer,
            })  # fmt: skip
        return out


@serve.deployment
class Classifiers:
    """Fine-tuned classifiers, loaded on demand per name (``@serve.multiplexed``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        bind_replica_grpc_to_node_ip()  # before Serve opens this replica's gRPC port
        self.cfg = parse_config(ServeJobConfig, config)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, name: str) -> tuple[Any, list[str]]:
        from cellfoundry.serve.loading import load_classifier, serving_device

        return load_classifier(
            self.cfg.classifiers[name], self.cfg.precision, serving_device(self.cfg.num_gpus)
        )

    async def classify(self, input_ids: np.ndarray) -> dict[str, Any]:
        import torch

        model, labels = await self.get_model(serve.get_multiplexed_model_id())
        device = next(model.parameters()).device
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)[None]
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()[0]
        probs = torch.softmax(logits, -1).cpu().numpy()
        best = int(probs.argmax())
        return {
            "label": labels[best],
            "probabilities": dict(zip(labels, probs.round(6).tolist(), strict=True)),
        }


# The ingress only awaits the model replicas: let it hold many requests (Serve's default is 5).
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class Api:
    """HTTP ingress: auth, body limits, validation and server-side tokenization (in worker
    threads, off the event loop), routing to the replicas."""

    def __init__(
        self, model: Any, classifiers: Any, config: dict[str, Any], token_sha256: str | None
    ) -> None:
        bind_replica_grpc_to_node_ip()  # before Serve opens this replica's gRPC port
        self.cfg = parse_config(ServeJobConfig, config)
        self.model, self.classifiers = model, classifiers
        self.token_sha256 = token_sha256
        limits = self.cfg.limits
        self.tokenizer = CellTokenizer.for_model(
            self.cfg.model, gene_medians=self.cfg.gene_medians, gene_table=self.cfg.gene_table,
            min_genes=limits.min_genes, max_genes=limits.max_genes,
            symbol_cache_size=limits.symbol_cache_size,
            unknown_symbol_cache_size=limits.unknown_symbol_cache_size,
        )  # fmt: skip
        # Parsing and tokenizing run in threads: small bodies never queue behind large ones.
        self._small = ThreadPoolExecutor(limits.small_request_threads, "cf-small-request")
        self._large = ThreadPoolExecutor(limits.large_request_threads, "cf-large-request")

    def tokenizer_cache_info(self) -> dict[str, int]:
        """The symbol caches' sizes and bounds (:meth:`CellTokenizer.cache_info`); for a
        deployment handle, not an HTTP route."""
        return self.tokenizer.cache_info()

    def _authorize(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
            raise RequestError(
                401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')"
            )

    async def _prepare(self, request: Request, prepare: Callable[[dict[str, Any]], T]) -> T:
        """Authorize, read the body within the limit, then parse and ``prepare`` it in a
        worker thread (the small- or the large-request pool, by body size)."""
        self._authorize(request)
        raw = await read_body(request, self.cfg.limits.max_body_bytes)
        small = len(raw) <= self.cfg.limits.small_body_bytes
        return await asyncio.get_running_loop().run_in_executor(
            self._small if small else self._large, lambda: prepare(parse_json(raw))
        )

    def _cell(self, body: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        if ("genes" in body) == ("input_ids" in body):
            raise RequestError(
                422, "send exactly one of 'genes' ({gene: raw count}) or 'input_ids' ([token ids])"
            )
        normalized = body.get("normalized", False)
        if type(normalized) is not bool:
            raise RequestError(
                422, "'normalized' must be true (depth-normalised values) or false (raw counts)"
            )
        if "input_ids" in body:
            if normalized:
                raise RequestError(422, "'normalized' applies to 'genes' values, not 'input_ids'")
            return self.tokenizer.check_ids(body["input_ids"]), None
        return self.tokenizer.tokenize(body["genes"], normalized=normalized)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.cfg.model,
            "classifiers": sorted(self.cfg.classifiers),
        }

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            self._authorize(request)
            return api.openapi()

        return await guard(run())

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        if self.token_sha256 is None:
            url = f"{request.scope.get('root_path', '').rstrip('/')}/openapi.json"
            return get_swagger_ui_html(openapi_url=url, title="cellfoundry")
        # Behind a token the page cannot fetch /openapi.json itself: it carries the spec.
        return get_swagger_ui_html(
            openapi_url="", title="cellfoundry", swagger_ui_parameters={"spec": api.openapi()}
        )

    @api.post("/embed")
    async def embed(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            ids, report = await self._prepare(request, self._cell)
            vector = await self.model.embed.remote(ids)
            return {"embedding": vector, "dim": len(vector), "n_tokens": len(ids), "genes": report}

        return await guard(run())

    @api.post("/classify")
    async def classify(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            name, ids, report = await self._prepare(request, self._classify_args)
            handle = self.classifiers.options(multiplexed_model_id=name)
            return {"classifier": name, **(await handle.classify.remote(ids)), "genes": report}

        return await guard(run())

    def _classify_args(self, body: dict[str, Any]) -> tuple[str, np.ndarray, dict[str, Any] | None]:
        name = body.get("classifier")
        choices = sorted(self.cfg.classifiers)
        if not isinstance(name, str):
            raise RequestError(422, f"'classifier' must be a name (a string), one of {choices}")
        if name not in self.cfg.classifiers:
            raise RequestError(404, f"unknown classifier {name[:80]!r}; choose one of {choices}")
        return (name, *self._cell(body))

    @api.post("/perturb")
    async def perturb(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            ids, report, specs, fraction = await self._prepare(request, self._perturb_args)
            results = await self.model.perturb.remote(ids, specs, fraction)
            return {"results": results, "genes": report}

        return await guard(run())

    def _perturb_args(
        self, body: dict[str, Any]
    ) -> tuple[np.ndarray, dict[str, Any] | None, list[tuple[str, list[int]]], float]:
        ids, report = self._cell(body)
        perts = body.get("perturbations")
        if not isinstance(perts, list) or not perts:
            raise RequestError(422, "'perturbations' must be a non-empty list of {type, genes}")
        if len(perts) > self.cfg.limits.max_perturbations:
            raise RequestError(
                413, f"{len(perts)} perturbations; at most {self.cfg.limits.max_perturbations}"
            )
        fraction = body.get("fraction", 0.25)
        if type(fraction) not in (int, float) or not 0 < fraction <= 1:
            raise RequestError(
                422,
                "'fraction' (ranks moved by inhibit/activate, share of the cell) must be in (0, 1]",
            )
        present = set(ids.tolist())
        return ids, report, [self._perturbation(p, present) for p in perts], float(fraction)

    def _perturbation(self, spec: Any, present: set[int]) -> tuple[str, list[int]]:
        kinds = ("delete", "overexpress", "inhibit", "activate")
        if not isinstance(spec, dict) or spec.get("type") not in kinds:
            raise RequestError(
                422, f"each perturbation needs 'type' in {list(kinds)} and 'genes'",
                got=repr(spec)[:200],
            )  # fmt: skip
        genes = spec.get("genes")
        if isinstance(genes, str):
            genes = [genes]
        if (
            not isinstance(genes, list)
            or not genes
            or not all(isinstance(g, str) for g in genes)
            or len(set(genes)) != len(genes)
            or len(genes) > self.tokenizer.model_input_size
        ):
            raise RequestError(
                422,
                "'genes' of a perturbation must be a gene name or a list of distinct gene names "
                f"(strings, at most {self.tokenizer.model_input_size})",
            )
        tokens = self.tokenizer.tokens_of(genes)
        absent = [g for g, t in zip(genes, tokens, strict=True) if t not in present]
        if absent and spec["type"] != "overexpress":
            raise RequestError(
                422,
                f"{spec['type']} needs genes the cell expresses (among its ranked genes)",
                absent=absent[:50],
            )
        return spec["type"], tokens


def _vocab(model_dir: str) -> dict[str, int]:
    return json.loads((artifacts.localize(model_dir) / "token_dictionary.json").read_text())


def build_app(
    cfg: ServeJobConfig | dict[str, Any], token_sha256: str | None = None
) -> serve.Application:
    """The application graph for ``serve.run`` (or a RayService ``import_path``: then
    ``cfg`` is the args dict ``{"config": PATH, "set": [...]}``)."""
    if isinstance(cfg, dict) and "config" in cfg:
        from cellfoundry.config import load_config

        cfg = load_config(ServeJobConfig, cfg["config"], cfg.get("set", []))
    elif isinstance(cfg, dict):
        cfg = parse_config(ServeJobConfig, cfg)
    if token_sha256 is None and cfg.auth_token_env is not None:
        # Built from an import_path (RayService): the token comes from this process's env.
        from cellfoundry.serve.runner import token_sha256 as _sha

        token_sha256 = _sha(cfg)
    data = config_to_dict(cfg)

    # Replicas may start in another directory: pin the driver's relative paths (URIs stay:
    # each replica reads its node's cached copy of the artifact).
    def pin(path: str) -> str:
        return path if storage.is_remote(path) else str(Path(path).resolve())

    for key in ("model", "gene_medians", "gene_table"):
        if data[key] is not None:
            data[key] = pin(data[key])
    data["classifiers"] = {k: pin(v) for k, v in data["classifiers"].items()}
    scale = cfg.autoscaling
    model = CellModel.options(
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        autoscaling_config={
            "min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
        },
        max_ongoing_requests=max(2 * cfg.batching.max_batch_size, 8),
    ).bind(data)  # fmt: skip
    classifiers = Classifiers.options(
        # No CPU reserved when no classifier is configured: the replica then only answers 4xx.
        ray_actor_options={
            "num_cpus": min(cfg.num_cpus, 0.5) if cfg.classifiers else 0,
            "num_gpus": cfg.num_gpus if cfg.classifiers else 0,
        },
        num_replicas=1,
    ).bind(data)
    return Api.bind(model, classifiers, data, token_sha256)


__all__ = ["Api", "CellModel", "Classifiers", "build_app"]
