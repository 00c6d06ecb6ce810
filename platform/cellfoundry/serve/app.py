"""The Ray Serve application: an HTTP ingress in front of batched model replicas.

Routes: ``GET /healthz``; ``POST /embed`` (a cell -> its embedding); ``POST /classify``
(a cell -> class probabilities from a named fine-tuned classifier or LoRA adapter,
multiplexed over replicas); ``POST /perturb`` (a cell and a few perturbations -> shifts).
A cell is ``{"genes": {gene: raw count}}`` (Ensembl IDs or symbols, tokenized on the server
with the model's own dictionaries) or ``{"input_ids": [...]}``. Every bad request gets a 4xx
JSON body ``{"error": ..., ...details}``; nothing a request sends takes a replica down.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type.
import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from cellfoundry.config import config_to_dict, parse_config
from cellfoundry.config.serve import ServeJobConfig
from cellfoundry.serve.errors import RequestError, guard
from cellfoundry.serve.tokenizer import CellTokenizer

logger = logging.getLogger(__name__)

api = FastAPI(title="cellfoundry", description=__doc__)


@serve.deployment
class CellModel:
    """A model replica: cell embeddings and perturbations with dynamic batching."""

    def __init__(self, config: dict[str, Any]) -> None:
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
        and, for the genes left, the mean / min cosine of their contextual embeddings."""
        from cellfoundry.infer.perturb import Perturbation, perturb_cells

        perts = [Perturbation(kind, tuple(tokens)) for kind, tokens in perturbations]  # type: ignore[arg-type]
        table = perturb_cells(self.embedder, [cell], perts, fraction=fraction, gene_shifts=True)
        out = []
        for row in table.to_pylist():
            gene_cos = np.asarray(row["gene_cos"], dtype=np.float64)
            out.append({
                "perturbation": row["perturbation"], "kind": row["kind"], "cell_cos": row["cell_cos"],
                "cell_shift": 1.0 - row["cell_cos"], "n_genes": row["n_genes"],
                "gene_cos_mean": float(gene_cos.mean()) if len(gene_cos) else None,
                "gene_cos_min": float(gene_cos.min()) if len(gene_cos) else None,
            })  # fmt: skip
        return out


@serve.deployment
class Classifiers:
    """Fine-tuned classifiers, loaded on demand per name (``@serve.multiplexed``)."""

    def __init__(self, config: dict[str, Any]) -> None:
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
    """HTTP ingress: validation, auth, server-side tokenization, routing to the replicas."""

    def __init__(
        self, model: Any, classifiers: Any, config: dict[str, Any], token_sha256: str | None
    ) -> None:
        self.cfg = parse_config(ServeJobConfig, config)
        self.model, self.classifiers = model, classifiers
        self.token_sha256 = token_sha256
        self.tokenizer = CellTokenizer.for_model(
            self.cfg.model, gene_medians=self.cfg.gene_medians, gene_table=self.cfg.gene_table,
            min_genes=self.cfg.limits.min_genes, max_genes=self.cfg.limits.max_genes,
        )  # fmt: skip

    async def _body(self, request: Request) -> dict[str, Any]:
        if self.token_sha256 is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(token.encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self.token_sha256):
                raise RequestError(
                    401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')"
                )
        raw = await request.body()
        if len(raw) > self.cfg.limits.max_body_bytes:
            raise RequestError(
                413, f"body of {len(raw)} bytes; at most {self.cfg.limits.max_body_bytes}"
            )
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    def _cell(self, body: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any] | None]:
        if ("genes" in body) == ("input_ids" in body):
            raise RequestError(
                422, "send exactly one of 'genes' ({gene: raw count}) or 'input_ids' ([token ids])"
            )
        if "input_ids" in body:
            return self.tokenizer.check_ids(body["input_ids"]), None
        return self.tokenizer.tokenize(body["genes"])

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.cfg.model,
            "classifiers": sorted(self.cfg.classifiers),
        }

    @api.post("/embed")
    async def embed(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            ids, report = self._cell(await self._body(request))
            vector = await self.model.embed.remote(ids)
            return {"embedding": vector, "dim": len(vector), "n_tokens": len(ids), "genes": report}

        return await guard(run())

    @api.post("/classify")
    async def classify(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            body = await self._body(request)
            name = body.get("classifier")
            if name not in self.cfg.classifiers:
                raise RequestError(
                    404 if isinstance(name, str) else 422,
                    f"unknown classifier {name!r}; choose one of {sorted(self.cfg.classifiers)}",
                )
            ids, report = self._cell(body)
            handle = self.classifiers.options(multiplexed_model_id=name)
            return {"classifier": name, **(await handle.classify.remote(ids)), "genes": report}

        return await guard(run())

    @api.post("/perturb")
    async def perturb(self, request: Request) -> JSONResponse:
        async def run() -> dict[str, Any]:
            body = await self._body(request)
            ids, report = self._cell(body)
            perts = body.get("perturbations")
            if not isinstance(perts, list) or not perts:
                raise RequestError(422, "'perturbations' must be a non-empty list of {type, genes}")
            if len(perts) > self.cfg.limits.max_perturbations:
                raise RequestError(
                    413, f"{len(perts)} perturbations; at most {self.cfg.limits.max_perturbations}"
                )
            fraction = body.get("fraction", 0.25)
            if (
                not isinstance(fraction, (int, float))
                or isinstance(fraction, bool)
                or not 0 < fraction <= 1
            ):
                raise RequestError(
                    422,
                    "'fraction' (ranks moved by inhibit/activate, share of the cell) must be in (0, 1]",
                )
            specs = [self._perturbation(p, ids) for p in perts]
            results = await self.model.perturb.remote(ids, specs, float(fraction))
            return {"results": results, "genes": report}

        return await guard(run())

    def _perturbation(self, spec: Any, ids: np.ndarray) -> tuple[str, list[int]]:
        kinds = ("delete", "overexpress", "inhibit", "activate")
        if not isinstance(spec, dict) or spec.get("type") not in kinds:
            raise RequestError(
                422, f"each perturbation needs 'type' in {list(kinds)} and 'genes'", got=spec
            )
        genes = spec.get("genes")
        if isinstance(genes, str):
            genes = [genes]
        if not isinstance(genes, list) or not genes or len(set(map(str, genes))) != len(genes):
            raise RequestError(
                422, "'genes' of a perturbation must be a gene or a list of distinct genes"
            )
        tokens = [self.tokenizer.token_of(g) for g in genes]
        present = set(ids.tolist())
        absent = [g for g, t in zip(genes, tokens, strict=True) if t not in present]
        if absent and spec["type"] != "overexpress":
            raise RequestError(
                422,
                f"{spec['type']} needs genes the cell expresses (among its ranked genes)",
                absent=absent,
            )
        return spec["type"], tokens


def _vocab(model_dir: str) -> dict[str, int]:
    return json.loads((Path(model_dir) / "token_dictionary.json").read_text())


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
    # Replicas may start in another directory: pin the driver's relative paths.
    for key in ("model", "gene_medians", "gene_table"):
        if data[key] is not None:
            data[key] = str(Path(data[key]).resolve())
    data["classifiers"] = {k: str(Path(v).resolve()) for k, v in data["classifiers"].items()}
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
