"""Stage 2 (pretraining) benchmark: tokens/s and MFU on one GPU, against the paper-style baseline.

    PYTHONPATH=platform python bench/pretrain.py              # one GPU -> bench/results/pretrain.json
    .venv/bin/python bench/pretrain.py --cpu-dry-run           # CPU check -> bench/out/pretrain_dry.json

1. Lengths: the real length distribution, one length per cell: the ``length`` column of a
   tokenized artifact (``--tokens DIR``), or the PBMC file (``pbmc_facs``, 3,874 cells):
   detected genes (count > 0) that are in the Geneformer V2 vocabulary (token and median
   dictionaries), + 2 for ``<cls>``/``<eos>``, clipped to ``--max-length``. The PBMC lengths
   are computed once with h5py and cached in ``bench/out/pretrain_lengths.json``; a GPU
   machine without h5py reads that file (carry it). Each configuration draws its cells as a
   stratified resample (evenly spaced quantiles, shuffled) of that distribution, so its
   timed steps hold the distribution's own mix of lengths. Token ids are random genes
   (``<cls>`` first, ``<eos>`` last), 15% masked 80/10/10 by ``MaskingCollator``; weights
   are random: throughput does not depend on either.
2. Optimized (``--presets``, default gf-104m and gf-316m): bf16 autocast over fp32 master
   weights, SDPA attention (``build_model``), the MLM head on masked positions only
   (``MaskedLMObjective``), fused ``torch.optim.AdamW``, TF32 for what stays fp32,
   length-grouped batches of at most ``--tokens-per-batch`` padded tokens (cells sorted by
   length, each batch padded to its longest row rounded up to 8), optionally
   ``torch.compile`` of the encoder (``--compile``, dynamic shapes; if compiling fails the
   preset is measured eager, and ``<preset>.compiled`` says which ran). Running out of
   memory halves the token budget and starts the preset again.
   Packed (``--packed``, on by default): the same presets on the padding-free path: the
   cells of each step packed into ``--tokens-per-batch // --max-length`` rows of
   ``--max-length`` tokens by ``cellfoundry.model.packing.pack(attention="flex")`` (first-fit
   decreasing; a FlexAttention document mask, so no cell sees another), the model switched
   with ``use_flex_attention``, position ids restarting per cell, the MLM head on masked
   positions only, attention dropout off (transformers' FlexAttention path refuses it). Packing runs inside the timed step (a training loop packs each batch it
   gets). Each step fills its rows, so the packed shape is fixed and nothing recompiles;
   keys ``<preset>.packed.*`` (``mfu`` on real tokens, as for the others).
3. Baseline (``--baseline-preset``, default gf-316m), as in the Geneformer paper: fp32 with
   TF32 off, eager attention, Hugging Face ``BertForMaskedLM`` loss (head on every
   position), ``torch.optim.AdamW``, random batches of ``--baseline-batch`` cells padded to
   ``--max-length``. It runs first: if it does not fit, nothing else is run.
4. Each configuration: warm-up steps, then timed full training steps (forward, backward,
   optimizer step) between two ``torch.cuda.synchronize()``. tokens/s counts real tokens
   only (no padding). Model FLOPs are ``cellfoundry.train.objective.training_flops`` on real
   tokens (attention on each cell's own length, the MLM head on masked positions); MFU =
   model FLOP/s / the GPU's dense bf16 peak (the table in ``cellfoundry.train.metrics``),
   for the fp32 baseline too.
5. Prints a table; on a GPU writes ``bench/results/pretrain.json`` and a row of
   ``bench/RESULTS.md`` (``--no-record``: ``bench/out/pretrain.json`` only). Without CUDA it
   runs only with ``--cpu-dry-run`` (preset ``tiny``, lengths scaled to 512, a few steps),
   which checks the code path end to end and writes ``bench/out/pretrain_dry.json``.

Self-contained for a GPU image with torch and transformers only: it loads the few
cellfoundry modules it needs (presets, build, masking, objective) without their packages'
``__init__`` (which pull in polars and the config and Ray Train modules), and never imports
ray, deepspeed or polars (the dry run checks).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import importlib
import importlib.util
import json
import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import (
    BENCH_DIR,
    OUT_DIR,
    command_line,
    device_string,
    format_table,
    refuse_imported,
    update_results_section,
    write_results,
)

SOURCE = "data/h5ad/pbmc_facs_zheng2017_3874cells.h5ad"
DICTIONARIES = "geneformer/v2"
LENGTHS_CACHE = OUT_DIR / "pretrain_lengths.json"
DEFAULT_PRESETS = ("gf-104m", "gf-316m")
DEFAULT_BASELINE = "gf-316m"
V2_MAX_LENGTH = 4096
CLS_ID, EOS_ID, FIRST_GENE_ID = 2, 3, 4  # V2 layout: <pad> 0, <mask> 1, <cls> 2, <eos> 3
PAD_MULTIPLE = 8
IGNORE_INDEX = -100  # label of unmasked positions (checked against cellfoundry's)
LR = 1e-4
#: Modules a GPU image lacks; the benchmark must not import them (checked by the dry run).
HEAVY_MODULES = ("ray", "deepspeed", "polars")
# the dry run checks code paths, not speed: small enough for `make test` on 2 cores
DRY = {"max_length": 256, "tokens_per_batch": 1024, "steps": 2, "warmup": 1,
       "baseline_batch": 2, "baseline_steps": 2, "baseline_warmup": 1}  # fmt: skip


# --------------------------------------------------------------------------------------------
# cellfoundry modules, without the packages' __init__
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    """The cellfoundry pieces the benchmark uses."""

    build_model: Callable[..., Any]
    bert_config: Callable[..., Any]
    MaskingCollator: type
    IGNORE_INDEX: int
    MaskedLMObjective: type
    training_flops: Callable[..., float]
    gpu_peak_table: tuple[tuple[str, float], ...]
    pack: Callable[..., Any]
    """``cellfoundry.model.packing.pack`` (padding-free rows, FlexAttention document mask)."""
    first_fit_decreasing: Callable[..., list[list[int]]]
    use_flex_attention: Callable[..., Any]
    flex_block: int
    """FlexAttention's tile: packed rows are padded to a multiple of it."""


def load_platform() -> Platform:
    """Import presets/build/masking/objective from ``cellfoundry.model`` / ``cellfoundry.train``
    with empty parent packages, so the GPU image (no polars, ray, deepspeed) can run them."""
    spec = importlib.util.find_spec("cellfoundry")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cellfoundry is not importable: run with PYTHONPATH=platform")
    root = Path(next(iter(spec.submodule_search_locations)))
    for sub in ("model", "train"):
        name = f"cellfoundry.{sub}"
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(root / sub)]
            sys.modules[name] = stub
    masking = importlib.import_module("cellfoundry.model.masking")
    model_pkg = sys.modules["cellfoundry.model"]
    if not hasattr(model_pkg, "IGNORE_INDEX"):
        model_pkg.IGNORE_INDEX = masking.IGNORE_INDEX  # objective.py: from cellfoundry.model import
    presets = importlib.import_module("cellfoundry.model.presets")
    build = importlib.import_module("cellfoundry.model.build")
    objective = importlib.import_module("cellfoundry.train.objective")
    packing = importlib.import_module("cellfoundry.model.packing")
    return Platform(
        build_model=build.build_model,
        bert_config=presets.bert_config,
        MaskingCollator=masking.MaskingCollator,
        IGNORE_INDEX=masking.IGNORE_INDEX,
        MaskedLMObjective=objective.MaskedLMObjective,
        training_flops=objective.training_flops,
        gpu_peak_table=_peak_table(root / "train" / "metrics.py"),
        pack=packing.pack,
        first_fit_decreasing=packing.first_fit_decreasing,
        use_flex_attention=packing.use_flex_attention,
        flex_block=packing.FLEX_BLOCK,
    )


def _peak_table(metrics_py: Path) -> tuple[tuple[str, float], ...]:
    """``GPU_PEAK_BF16`` of cellfoundry.train.metrics, read from its source (that module
    imports the config package)."""
    for node in ast.parse(metrics_py.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "GPU_PEAK_BF16" for t in node.targets
        ):
            return tuple((str(k), float(v)) for k, v in ast.literal_eval(node.value))
    raise RuntimeError(f"{metrics_py}: no GPU_PEAK_BF16 table")


def peak_flops(table: Sequence[tuple[str, float]], device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of ``device_name`` (first matching substring), None if unknown."""
    return next((peak for key, peak in table if key in device_name), None)


# --------------------------------------------------------------------------------------------
# 1. Lengths
# --------------------------------------------------------------------------------------------


def lengths_from_tokens(directory: Path) -> np.ndarray:
    """The ``length`` column of every ``part-*.parquet`` shard of a tokenized artifact."""
    import pyarrow.parquet as pq

    files = sorted(Path(directory).glob("part-*.parquet"))
    if not files:
        raise SystemExit(f"--tokens {directory}: no part-*.parquet shards (run `make demo`?)")
    return np.concatenate(
        [pq.read_table(f, columns=["length"])["length"].to_numpy() for f in files]
    )


def lengths_from_h5ad(h5ad: Path, dictionaries: Path) -> np.ndarray:
    """Per cell: genes with count > 0 that have a V2 token and median, + 2 (unclipped).

    Reads the CSR arrays and ``var/ensembl_id`` with h5py (no anndata)."""
    import h5py

    tokens = json.loads(next(dictionaries.glob("token_dictionary*.json")).read_text())
    medians = json.loads(next(dictionaries.glob("gene_median_dictionary*.json")).read_text())
    vocab = {g for g in tokens if not g.startswith("<")} & set(medians)
    with h5py.File(h5ad, "r") as f:
        enc = f["X"].attrs.get("encoding-type")
        if enc != "csr_matrix":
            raise SystemExit(f"{h5ad}: X is {enc!r}, expected csr_matrix")
        indptr, indices, data = f["X/indptr"][:], f["X/indices"][:], f["X/data"][:]
        ens = f["var/ensembl_id"]
        if isinstance(ens, h5py.Group):  # categorical column
            ids = ens["categories"].asstr()[:][ens["codes"][:]]
        else:
            ids = ens.asstr()[:]
    in_vocab = np.array([str(g).split(".")[0] in vocab for g in ids])
    n_cells = len(indptr) - 1
    row = np.repeat(np.arange(n_cells), np.diff(indptr))
    keep = in_vocab[indices] & (data != 0)
    genes = np.bincount(row[keep], minlength=n_cells)
    return genes[genes > 0] + 2


def load_lengths(args: argparse.Namespace) -> tuple[np.ndarray, str]:
    """Real lengths (unclipped) and a description of where they come from."""
    if args.tokens:
        return lengths_from_tokens(Path(args.tokens)), f"tokenized artifact {args.tokens}"
    path = Path(args.lengths) if args.lengths else LENGTHS_CACHE
    if path.is_file():
        doc = json.loads(path.read_text())
        return np.asarray(doc["lengths"], dtype=np.int64), doc["source"]
    if args.lengths:
        raise SystemExit(f"--lengths {path}: no such file")
    from cellfoundry.paths import shared_path

    h5ad, dicts = shared_path(SOURCE), shared_path(DICTIONARIES)
    try:
        lengths = lengths_from_h5ad(h5ad, dicts)
    except (ImportError, OSError, StopIteration) as e:
        raise SystemExit(
            f"no lengths: {LENGTHS_CACHE} is missing and {h5ad} could not be read ({e}). Run "
            "this script once where h5py and the shared data are (e.g. with --cpu-dry-run) and "
            f"carry {LENGTHS_CACHE.relative_to(BENCH_DIR.parent)}, or pass --tokens/--lengths"
        ) from e
    source = f"{SOURCE}: detected genes in the V2 vocabulary + 2 per cell ({len(lengths):,} cells)"
    LENGTHS_CACHE.parent.mkdir(parents=True, exist_ok=True)
    LENGTHS_CACHE.write_text(json.dumps({"source": source, "lengths": lengths.tolist()}) + "\n")
    return lengths, source


def stratified(dist: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` lengths at evenly spaced quantiles of ``dist``, shuffled (a low-noise resample)."""
    s = np.sort(dist)
    out = s[np.minimum(((np.arange(n) + 0.5) / n * len(s)).astype(np.int64), len(s) - 1)]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------------------------
# 2. Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One step's tensors (CPU, pinned on a GPU run) and its counts."""

    tensors: dict[str, torch.Tensor]
    """input_ids, attention_mask, labels: int64 (rows, width)."""
    n_real: int
    sum_sq: int
    n_masked: int
    packed_shape: tuple[int, int] | None = None
    """(rows, width) the cells take once packed (packed runs only; the model sees that)."""

    @property
    def rows(self) -> int:
        """Cells in the step."""
        return self.tensors["input_ids"].shape[0]

    @property
    def padded(self) -> int:
        """Tokens the model computes on, padding included."""
        if self.packed_shape is not None:
            return self.packed_shape[0] * self.packed_shape[1]
        return self.tensors["input_ids"].numel()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def budget_groups(lengths: np.ndarray, tokens_per_batch: int, multiple: int) -> list[np.ndarray]:
    """Cells sorted by length (longest first), cut into batches whose padded size (rows x
    longest rounded up to ``multiple``) stays within ``tokens_per_batch``; longest batch first."""
    order = np.argsort(-lengths, kind="stable")
    groups, start = [], 0
    while start < len(order):
        width = _round_up(int(lengths[order[start]]), multiple)
        rows = max(1, tokens_per_batch // width)
        groups.append(order[start : start + rows])
        start += rows
    return groups


def packed_groups(
    lengths: np.ndarray, rows: int, row_length: int, ffd: Callable[..., list[list[int]]]
) -> list[np.ndarray]:
    """Consecutive cells (in the order given) per step: the most that first-fit decreasing
    (``ffd``, as ``pack`` uses it) puts into ``rows`` rows of ``row_length`` tokens. Every
    group but the last fills exactly ``rows`` rows, so the packed shape stays the same from
    step to step (nothing recompiles); the last one is dropped when it is not the only one."""
    groups, start, n = [], 0, len(lengths)
    while start < n:
        end = start + 1
        while end < n and len(ffd(lengths[start : end + 1].tolist(), row_length)) <= rows:
            end += 1
        groups.append(np.arange(start, end))
        start = end
    if len(groups) > 1 and len(ffd(lengths[groups[-1]].tolist(), row_length)) < rows:
        groups.pop()
    return groups


def packed_shape(
    lengths: np.ndarray, row_length: int, ffd: Callable[..., list[list[int]]], block: int
) -> tuple[int, int]:
    """(rows, width) of ``pack(..., attention="flex")`` for cells of these lengths."""
    bins = ffd(lengths.tolist(), row_length)
    return len(bins), _round_up(max(int(lengths[b].sum()) for b in bins), block)


def make_batch(
    lengths: np.ndarray, collator: Any, rng: np.random.Generator, vocab_size: int, pin: bool
) -> Batch:
    """Random gene tokens of the given lengths, padded and masked by ``collator``."""
    seqs = []
    for n in lengths.tolist():
        s = rng.integers(FIRST_GENE_ID, vocab_size, n, dtype=np.int64)
        s[0], s[-1] = CLS_ID, EOS_ID
        seqs.append(s)
    t = collator(seqs)
    if pin:
        t = {k: v.pin_memory() for k, v in t.items()}
    n_masked = int((t["labels"] != IGNORE_INDEX).sum())
    lens = lengths.astype(np.int64)
    return Batch(t, int(lens.sum()), int((lens**2).sum()), n_masked)


# --------------------------------------------------------------------------------------------
# 3. Training steps
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """What one configuration's timed steps gave."""

    label: str
    preset: str
    precision: str
    steps: int
    seconds: float
    n_real: int
    n_padded: int
    rows: int
    flops: float
    peak_mem_gb: float | None
    tokens_per_batch: int | None
    batch_rows: int | None
    final_loss: float
    compiled: bool = False
    new_graphs_timed: int = 0
    packed: bool = False
    """Padding-free packed rows (FlexAttention document mask) instead of padded batches."""

    @property
    def key(self) -> str:
        """Metric prefix: ``<preset>`` (length-grouped) or ``<preset>.packed``."""
        return f"{self.preset}.packed" if self.packed else self.preset

    @property
    def tokens_per_s(self) -> float:
        return self.n_real / self.seconds

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_real / self.n_padded


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.tensors.items()}


def time_steps(
    step: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    warm: Sequence[Batch],
    timed: Sequence[Batch],
    device: torch.device,
) -> tuple[float, float, int]:
    """Run ``warm`` then ``timed`` steps; wall seconds of the timed ones, the last loss and
    the graphs torch.compile made during the timed steps (0 unless something recompiled)."""
    loss = None
    for i, b in enumerate(warm):
        t0 = time.perf_counter()
        loss = step(_to(b, device))
        _sync(device)
        print(f"    warm-up {i + 1}/{len(warm)}: {b.rows} x {b.tensors['input_ids'].shape[1]}"
              f" ({time.perf_counter() - t0:.2f} s)", flush=True)  # fmt: skip
    _sync(device)
    graphs = _compiled_graphs()
    start = time.perf_counter()
    for b in timed:
        loss = step(_to(b, device))
    _sync(device)
    seconds = time.perf_counter() - start
    graphs = _compiled_graphs() - graphs
    if graphs:
        print(f"    warning: torch.compile made {graphs} graphs during the timed steps")
    final = float(loss.detach().float()) if loss is not None else math.nan
    if not math.isfinite(final):
        raise RuntimeError(f"loss is {final} after the timed steps")
    return seconds, final, graphs


def _compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def measure(
    make_step: Callable[[], Callable[[dict[str, torch.Tensor]], torch.Tensor]],
    warm: Sequence[Batch],
    timed: Sequence[Batch],
    device: torch.device,
) -> tuple[float, float, float | None, int]:
    """Build the model and optimizer (``make_step``), time the steps; seconds, last loss and
    peak GPU memory (GB, weights and optimizer state included). The model is freed on return."""
    _release(device)
    try:
        seconds, loss, graphs = time_steps(make_step(), warm, timed, device)
        return seconds, loss, _peak_gb(device), graphs
    finally:
        _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def run_optimized(
    plat: Platform,
    preset: str,
    dist: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    *,
    packed: bool = False,
) -> Measured:
    """bf16 autocast + SDPA + length-grouped batches (+ compile), or with ``packed`` the
    padding-free path (FlexAttention over packed rows); halves the token budget on OOM."""
    budget, compiled = args.tokens_per_batch, args.compile
    while True:
        try:
            return _run_optimized(plat, preset, dist, args, device, budget, compiled, packed)
        except torch.cuda.OutOfMemoryError:
            if budget <= args.max_length:
                raise
            failure = "oom"
        except Exception as e:
            if not compiled:
                raise
            failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # outside the except blocks: their traceback (holding the model) is gone
        if compiled:
            torch._dynamo.reset()
        if failure == "oom":
            print(f"    out of memory at {budget:,} tokens per batch: halving", flush=True)
            budget //= 2
        else:
            print(f"    torch.compile run failed ({failure[:300]}): measuring eager", flush=True)
            compiled = False
        _release(device)


def _step_batches(
    plat: Platform,
    dist: np.ndarray,
    args: argparse.Namespace,
    budget: int,
    packed: bool,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    """Cell lengths of the warm-up and timed steps: ``(warm_groups, timed_groups, warm_lens,
    timed_lens)``, each group indexing its lengths array. Length-grouped: batches of at most
    ``budget`` padded tokens. Packed: ``budget // max_length`` full rows per step."""
    mean = float(dist.mean())
    if packed:
        rows, width = max(1, budget // args.max_length), args.max_length
        per_step = 1.1 * rows * width / mean  # cells per step, with room for imperfect packing
        warm_lens = stratified(dist, max(1, round(args.warmup * per_step)), rng)
        warm_lens[0] = dist.max()  # the longest cell early: memory fails in the warm-up
        timed_lens = stratified(dist, max(1, round(args.steps * per_step)), rng)
        ffd = plat.first_fit_decreasing
        warm_groups = packed_groups(warm_lens, rows, width, ffd)[: args.warmup]
        timed_groups = packed_groups(timed_lens, rows, width, ffd)[: args.steps]
        return warm_groups, timed_groups, warm_lens, timed_lens
    # warm-up: the longest cells first (largest shapes, so memory fails early), then a mix
    warm_lens = stratified(dist, max(1, round(args.warmup * budget / mean)), rng)
    warm_lens[0] = dist.max()
    warm_groups = budget_groups(warm_lens, budget, PAD_MULTIPLE)
    warm_groups = [warm_groups[0], *[warm_groups[i] for i in rng.permutation(len(warm_groups))
                                     if i != 0]][: args.warmup]  # fmt: skip
    timed_lens = stratified(dist, max(1, round(args.steps * budget / mean)), rng)
    timed_groups = budget_groups(timed_lens, budget, PAD_MULTIPLE)
    timed_groups = [timed_groups[i] for i in rng.permutation(len(timed_groups))]
    return warm_groups, timed_groups, warm_lens, timed_lens


def _run_optimized(
    plat: Platform,
    preset: str,
    dist: np.ndarray,
    args: argparse.Namespace,
    device: torch.device,
    budget: int,
    compiled: bool,
    packed: bool,
) -> Measured:
    rng = np.random.default_rng([args.seed, 3 if packed else 1])
    cfg = plat.bert_config(preset, max_position_embeddings=args.max_position)
    if packed:
        # transformers' FlexAttention path refuses attention dropout in training (it has
        # none): the packed runs train without it (the other dropouts stay)
        cfg.attention_probs_dropout_prob = 0.0
    collator = plat.MaskingCollator(
        vocab_size=cfg.vocab_size,
        max_length=args.max_length,
        pad_to_multiple_of=PAD_MULTIPLE,
        generator=torch.Generator().manual_seed(args.seed),
    )
    pin = device.type == "cuda"
    warm_groups, timed_groups, warm_lens, timed_lens = _step_batches(
        plat, dist, args, budget, packed, rng
    )
    warm = [make_batch(warm_lens[g], collator, rng, cfg.vocab_size, pin) for g in warm_groups]
    timed = [make_batch(timed_lens[g], collator, rng, cfg.vocab_size, pin) for g in timed_groups]
    if packed:
        for b, lens in [*zip(warm, (warm_lens[g] for g in warm_groups), strict=True),
                        *zip(timed, (timed_lens[g] for g in timed_groups), strict=True)]:  # fmt: skip
            b.packed_shape = packed_shape(lens, args.max_length, plat.first_fit_decreasing,
                                          plat.flex_block)  # fmt: skip

    def make_step() -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
        model = plat.build_model(cfg, seed=args.seed).to(device)  # fp32 master weights, SDPA
        model.train()
        objective = plat.MaskedLMObjective(model)  # MLM head on masked positions only
        # packed: FlexAttention for the model's whole life (it is dropped after this
        # configuration), switched before any compile so the compiled graph holds it; the
        # steps keep the stack referenced (a collected context manager would switch back)
        flex = contextlib.ExitStack()
        if packed:
            flex.enter_context(plat.use_flex_attention(model))
        if compiled:
            model.bert = torch.compile(model.bert, dynamic=not packed)  # packed: fixed shapes
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=True)

        def step(b: dict[str, torch.Tensor]) -> torch.Tensor:
            with _autocast(device):
                out = objective(b["input_ids"], b["attention_mask"], b["labels"])
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss

        def packed_step(b: dict[str, torch.Tensor]) -> torch.Tensor:
            # packing is part of the step (a training loop packs each batch it gets): drop the
            # padding, first-fit the cells into rows, build the document mask on the device
            _ = flex  # referenced here, so the FlexAttention switch lives as long as the step
            p, _ = plat.pack(b, row_length=args.max_length, attention="flex")
            labels = p["labels"]  # (R, W), -100 outside the masked positions
            with _autocast(device), torch.set_grad_enabled(backward):
                hidden = model.bert(
                    input_ids=p["input_ids"],
                    position_ids=p["position_ids"],
                    attention_mask=p["attention_mask"],
                )[0]  # (R, W, H); fmt: skip
                chosen = labels != IGNORE_INDEX
                logits = model.cls(hidden[chosen])  # (M, V): the MLM head on masked tokens only
                loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
            if not backward:
                return loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return packed_step if packed else step

    # FlexAttention has no backward on CPU (torch raises): a CPU dry run checks the packed
    # path's forward and loss only
    backward = not (packed and device.type == "cpu")

    what = (f"{len(timed)} timed steps of {max(1, budget // args.max_length)} packed rows x "
            f"{args.max_length}" if packed else
            f"{len(timed)} timed steps, <= {budget:,} padded tokens each")  # fmt: skip
    print(f"  {preset} {'packed' if packed else 'optimized'}: {what}", flush=True)
    seconds, loss, peak, graphs = measure(make_step, warm, timed, device)
    precision = (
        (
            "bf16 autocast, FlexAttention, packed rows (padding-free), no attention dropout"
            if packed
            else "bf16 autocast, SDPA, length-grouped"
        )
        + (", compiled" if compiled else "")
        + ("" if backward else ", forward only (CPU)")
    )
    label = f"{preset} {'packed' if packed else 'optimized'}"
    r = _measured(
        plat, cfg, label, preset, precision, timed, seconds, peak, budget, None, loss,
    )  # fmt: skip
    r.compiled, r.new_graphs_timed, r.packed = compiled, graphs, packed
    return r


def run_baseline(
    plat: Platform, dist: np.ndarray, args: argparse.Namespace, device: torch.device
) -> Measured:
    """fp32 (no TF32), eager attention, HF loss, random batches padded to ``max_length``."""
    import transformers

    preset = args.baseline_preset
    rng = np.random.default_rng([args.seed, 2])
    cfg = plat.bert_config(preset, max_position_embeddings=args.max_position)
    collator = plat.MaskingCollator(
        vocab_size=cfg.vocab_size,
        max_length=args.max_length,
        pad_to_multiple_of=args.max_length,  # every batch padded to max_length
        generator=torch.Generator().manual_seed(args.seed + 1),
    )
    pin = device.type == "cuda"
    bs = args.baseline_batch
    warm_lens = stratified(dist, args.baseline_warmup * bs, rng)
    timed_lens = stratified(dist, args.baseline_steps * bs, rng)  # random order = random batches
    warm = [make_batch(warm_lens[i : i + bs], collator, rng, cfg.vocab_size, pin)
            for i in range(0, len(warm_lens), bs)]  # fmt: skip
    timed = [make_batch(timed_lens[i : i + bs], collator, rng, cfg.vocab_size, pin)
             for i in range(0, len(timed_lens), bs)]  # fmt: skip

    def make_step() -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        torch.set_float32_matmul_precision("highest")  # plain fp32, no TF32
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            model = transformers.AutoModelForMaskedLM.from_config(cfg, attn_implementation="eager")
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)

        def step(b: dict[str, torch.Tensor]) -> torch.Tensor:
            out = model(**b)  # HF loss: MLM head on every position
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss

        return step

    print(f"  {preset} baseline: {len(timed)} timed steps of {bs} x {args.max_length}", flush=True)
    seconds, loss, peak, _ = measure(make_step, warm, timed, device)
    return _measured(
        plat, cfg, f"{preset} baseline", preset, _base_precision(args), timed, seconds,
        peak, None, bs, loss,
    )  # fmt: skip


def _base_precision(args: argparse.Namespace) -> str:
    return f"fp32, eager attention, random batches padded to {args.max_length}"


def _measured(
    plat: Platform, cfg: Any, label: str, preset: str, precision: str, timed: Sequence[Batch],
    seconds: float, peak: float | None, budget: int | None, rows: int | None, loss: float,
) -> Measured:  # fmt: skip
    flops = sum(plat.training_flops(cfg, b.n_real, b.sum_sq, b.n_masked) for b in timed)
    return Measured(
        label=label,
        preset=preset,
        precision=precision,
        steps=len(timed),
        seconds=seconds,
        n_real=sum(b.n_real for b in timed),
        n_padded=sum(b.padded for b in timed),
        rows=sum(b.rows for b in timed),
        flops=flops,
        peak_mem_gb=peak,
        tokens_per_batch=budget,
        batch_rows=rows,
        final_loss=loss,
    )


# --------------------------------------------------------------------------------------------
# 4. Report
# --------------------------------------------------------------------------------------------


def gpu_device_string(device: torch.device) -> str:
    """E.g. ``gpu: NVIDIA H100 80GB HBM3 (79.1 GiB), 1 of 1; torch 2.x, CUDA 12.x; host ...``."""
    props = torch.cuda.get_device_properties(device)
    return (
        f"gpu: {props.name} ({props.total_memory / 1024**3:.1f} GiB), 1 of "
        f"{torch.cuda.device_count()}; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"host {device_string()}"
    )


def metrics_of(
    results: Sequence[Measured], base: Measured, peak: float | None, info: dict[str, Any]
) -> dict[str, Any]:
    m: dict[str, Any] = dict(info)
    for r in [*results, base]:
        key = "baseline" if r is base else r.key
        m[f"{key}.tokens_per_s"] = round(r.tokens_per_s, 1)
        m[f"{key}.tflops_per_s"] = round(r.flops_per_s / 1e12, 3)
        if peak:
            m[f"{key}.mfu"] = round(r.flops_per_s / peak, 4)
        if r.peak_mem_gb is not None:
            m[f"{key}.peak_mem_gb"] = round(r.peak_mem_gb, 2)
        m[f"{key}.steps"] = r.steps
        m[f"{key}.step_s"] = round(r.seconds / r.steps, 4)
        m[f"{key}.cells_per_step"] = round(r.rows / r.steps, 2)
        m[f"{key}.real_tokens_per_step"] = round(r.n_real / r.steps, 1)
        m[f"{key}.padding_fraction"] = round(r.padding_fraction, 4)
        m[f"{key}.final_loss"] = round(r.final_loss, 4)
        m[f"{key}.precision"] = r.precision
        if r.tokens_per_batch is not None:
            m[f"{key}.tokens_per_batch"] = r.tokens_per_batch
        if r.batch_rows is not None:
            m[f"{key}.batch_size"] = r.batch_rows
        if r is not base:
            m[f"{key}.compiled"] = int(r.compiled)
            if r.compiled:
                m[f"{key}.graphs_compiled_in_timed_steps"] = r.new_graphs_timed
    m["baseline.preset"] = base.preset
    if peak:
        m["baseline.mfu_note"] = "fp32 run, MFU against the same dense bf16 peak as the others"
    for r in results:
        if r.preset == base.preset:
            m[f"{r.key}.speedup_vs_baseline"] = round(r.tokens_per_s / base.tokens_per_s, 2)
    return m


def print_table(results: Sequence[Measured], base: Measured, peak: float | None) -> None:
    header = ["config", "precision", "steps", "cells/step", "padding %", "tokens/s", "TFLOP/s",
              "MFU %", "peak GB"]  # fmt: skip
    rows = []
    for r in [*results, base]:
        rows.append([
            r.label, r.precision, r.steps, round(r.rows / r.steps, 1),
            round(100 * r.padding_fraction, 1), round(r.tokens_per_s, 1),
            round(r.flops_per_s / 1e12, 3),
            round(100 * r.flops_per_s / peak, 1) if peak else "-",
            round(r.peak_mem_gb, 1) if r.peak_mem_gb is not None else "-",
        ])  # fmt: skip
    print(format_table(rows, header))


def update_results_md(doc: dict[str, Any]) -> Path:
    """Replace this device's row (or add one) in the pretraining section of RESULTS.md."""
    m = doc["metrics"]

    def pct(key: str) -> str:
        return f"{100 * m[key]:.1f}%" if key in m else "-"

    def num(key: str) -> str:
        return f"{m[key]:,.0f}" if key in m else "-"

    gpu = doc["device"].split(";")[0].removeprefix("gpu: ")
    row = (
        f"| {doc['date']} | {gpu} | {pct('gf-104m.mfu')} | {pct('gf-316m.mfu')} | "
        f"{pct('gf-104m.packed.mfu')} | {pct('gf-316m.packed.mfu')} | "
        f"{num('gf-316m.tokens_per_s')} | {num('baseline.tokens_per_s')} | "
        f"{m.get('gf-316m.speedup_vs_baseline', '-')}x | {num('gf-316m.tokens_per_batch')} | "
        f"{'yes' if m.get('gf-316m.compiled') else 'no'} | `{doc['command']}` |"
    )
    header = [
        "## Pretraining throughput, one GPU (`bench/pretrain.py`)",
        "",
        "bf16 autocast + SDPA + length-grouped batches vs the paper-style baseline (gf-316m, "
        "fp32, eager attention, random batches padded to 4,096), measured in the same run; "
        "inputs up to 4,096 tokens with the PBMC length distribution, tokens/s and MFU on real "
        "tokens only; MFU against the GPU's dense bf16 peak, the fp32 baseline's too. "
        "Packed: the padding-free path (cells packed into rows of 4,096, FlexAttention "
        "document mask, `model/packing.py`). All figures: `results/pretrain.json`.",
        "",
        "| date | GPU | gf-104m MFU | gf-316m MFU | gf-104m packed MFU | gf-316m packed MFU | "
        "gf-316m tokens/s | baseline tokens/s | speedup | tokens/batch | compiled | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return update_results_section("pretrain", header, row=row, device=gpu)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(DEFAULT_PRESETS),
                   help="optimized runs, comma-separated (default %(default)s)")  # fmt: skip
    p.add_argument("--baseline-preset", default=DEFAULT_BASELINE)
    p.add_argument("--max-length", type=int, default=V2_MAX_LENGTH, help="input tokens per cell")
    p.add_argument("--tokens-per-batch", type=int, default=32_768,
                   help="padded tokens per optimized step (halved on out-of-memory)")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help="timed optimized steps (about)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--baseline-batch", type=int, default=1, help="cells per baseline step")
    p.add_argument("--baseline-steps", type=int, default=30)
    p.add_argument("--baseline-warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the padding-free path: cells packed into rows of "
                        "--max-length with a FlexAttention document mask (default on)")  # fmt: skip
    p.add_argument("--tokens", help="tokenized artifact folder (part-*.parquet with `length`)")
    p.add_argument("--lengths", help=f"lengths JSON (default {LENGTHS_CACHE.name} in bench/out)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the GPU is not known")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", action="store_true",
                   help="write bench/out/pretrain.json only (not results/ or RESULTS.md)")  # fmt: skip
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU: preset tiny, short lengths, a few steps -> bench/out")  # fmt: skip
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        args.presets, args.baseline_preset = "tiny", "tiny"
        for k, v in DRY.items():
            setattr(args, k, v)
    args.preset_list = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.max_position = max(V2_MAX_LENGTH, args.max_length)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(
            "bench/pretrain.py measures one GPU and no CUDA device is visible. Run it on a GPU "
            "(PYTHONPATH=platform python bench/pretrain.py), or check the code path on CPU with "
            "--cpu-dry-run (writes bench/out/pretrain_dry.json only).",
            file=sys.stderr,
        )
        return 2
    dry = args.cpu_dry_run and not cuda
    if args.cpu_dry_run and cuda:
        print("--cpu-dry-run on a CUDA machine: running the dry-run sizes on the GPU")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    plat = load_platform()
    if plat.IGNORE_INDEX != IGNORE_INDEX:
        raise RuntimeError(f"cellfoundry's IGNORE_INDEX is {plat.IGNORE_INDEX}, not {IGNORE_INDEX}")

    dist_full, source = load_lengths(args)
    dist = np.minimum(dist_full, V2_MAX_LENGTH)
    if args.cpu_dry_run:  # scale the distribution down to the dry run's input length
        dist = np.maximum(3, np.rint(dist * args.max_length / V2_MAX_LENGTH)).astype(np.int64)
    dist = np.minimum(dist, args.max_length)

    dev = gpu_device_string(device) if cuda else device_string()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if cuda and peak is None:
        name = torch.cuda.get_device_name(device)
        peak = peak_flops(plat.gpu_peak_table, name)
        if peak is None:
            print(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16) for MFU", file=sys.stderr)
    print(f"device: {dev}")
    print(f"dense bf16 peak: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no MFU)'}")
    print(f"lengths: {source}; used up to {args.max_length}: mean {dist.mean():.0f}, median "
          f"{np.median(dist):.0f}, max {dist.max()}")  # fmt: skip

    try:  # the baseline first: if it does not fit, nothing else is worth running
        base = run_baseline(plat, dist, args, device)
    except torch.cuda.OutOfMemoryError as e:
        raise SystemExit(
            f"the baseline ({args.baseline_preset}, fp32 eager, {args.baseline_batch} x "
            f"{args.max_length}) does not fit on this GPU: {e}"
        ) from None
    results = [run_optimized(plat, p, dist, args, device) for p in args.preset_list]
    if args.packed:  # the padding-free path, same presets, same length distribution
        results += [run_optimized(plat, p, dist, args, device, packed=True)
                    for p in args.preset_list]  # fmt: skip
    info: dict[str, Any] = {
        "max_length": args.max_length,
        "compile_requested": int(args.compile),
        "packed_requested": int(args.packed),
        "torch": torch.__version__,
        "lengths.source": source,
        "lengths.mean": round(float(dist.mean()), 1),
        "lengths.median": float(np.median(dist)),
        "lengths.max": int(dist.max()),
    }
    if peak:
        info["peak_bf16_tflops"] = round(peak / 1e12, 1)
    metrics = metrics_of(results, base, peak, info)
    print()
    print_table(results, base, peak)

    if dry:
        refuse_imported(HEAVY_MODULES)
        path = write_results("pretrain_dry", metrics, device=dev, results_dir=OUT_DIR)
        print(f"\ndry run (CPU, preset tiny, not a result): {path.relative_to(BENCH_DIR.parent)}")
        return 0
    spec_run = (
        set(DEFAULT_PRESETS) <= set(args.preset_list)
        and args.baseline_preset == DEFAULT_BASELINE
        and args.max_length == V2_MAX_LENGTH
        and not args.cpu_dry_run
        and peak is not None
    )
    if args.no_record or not spec_run:
        if not args.no_record:
            print("\nnot the issue's configuration (presets, baseline, 4,096, known peak): "
                  "not recording in bench/results")  # fmt: skip
        path = write_results("pretrain", metrics, device=dev, results_dir=OUT_DIR)
        print(f"\nwrote {path.relative_to(BENCH_DIR.parent)}")
        return 0
    path = write_results("pretrain", metrics, device=dev, command=command_line())
    doc = json.loads(path.read_text())
    md = update_results_md(doc)
    print(f"\nwrote {path.relative_to(BENCH_DIR.parent)} and {md.relative_to(BENCH_DIR.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
