"""Import the Geneformer dictionaries (token ids, gene medians, symbol and ID mappings).

The published dictionaries are pickles. A pickle can run arbitrary code when loaded, so
``.pkl`` files go through :class:`_RestrictedUnpickler`, which refuses every global except
the two NumPy constructors needed to rebuild numeric scalars (the real V1 files store
``numpy.float64`` medians and ``numpy.int16`` token ids). Those are replaced by checked
stand-ins that only build numeric scalars and return plain Python numbers.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

__all__ = [
    "DictionaryError",
    "GeneformerDictionaries",
    "UnsafePickleError",
    "load_dictionary_file",
]

_ACCEPTED = "only plain dicts of str to int/float/str are accepted"
_CONVERT_HINT = (
    "use the .json rendering beside it, or, if you trust the file, convert it once in a "
    'throwaway environment: python -c "import json,pickle,sys; '
    "json.dump(pickle.load(open(sys.argv[1],'rb')), open(sys.argv[1][:-4]+'.json','w'), "
    'indent=0, default=float)" FILE.pkl'
)
# Numeric dtypes a NumPy scalar in a dictionary pickle may have (no object, str or void).
_NUMERIC_KINDS = frozenset("iuf")


class DictionaryError(ValueError):
    """A dictionary file is missing, unreadable or does not hold a str -> number/str dict."""


class UnsafePickleError(DictionaryError, pickle.UnpicklingError):
    """A pickle asked for a global (class or function) that is not allowed."""


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """Stand-in for ``numpy.dtype`` in pickles: numeric dtypes only."""
    # copy=True: BUILD then sets state on a fresh dtype, never on NumPy's shared singleton.
    dtype = np.dtype(name, align=bool(align), copy=True) if isinstance(name, str) else None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS:
        raise UnsafePickleError(f"refusing numpy dtype {name!r}: {_ACCEPTED}")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> int | float:
    """Stand-in for ``numpy.core.multiarray.scalar``: a numeric scalar as a Python number."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS):
        raise UnsafePickleError(f"refusing numpy scalar of dtype {dtype!r}: {_ACCEPTED}")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"malformed numpy scalar payload for dtype {dtype}")
    return np.frombuffer(data, dtype=dtype)[0].item()


_ALLOWED_GLOBALS = {
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves no global except the checked NumPy scalar stand-ins."""

    def __init__(self, file: Any, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name} from {self._source}: {_ACCEPTED}; "
                f"{_CONVERT_HINT}"
            )
        return allowed


def _validate(obj: Any, source: Path) -> dict[str, Any]:
    """Check that ``obj`` is a dict of str -> int/float/str and return it."""
    if not isinstance(obj, dict):
        raise DictionaryError(
            f"{source} holds a {type(obj).__name__}, not a dict: {_ACCEPTED}; {_CONVERT_HINT}"
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise DictionaryError(
                f"{source}: key {key!r} is a {type(key).__name__}, not a str: {_ACCEPTED}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise DictionaryError(
                f"{source}: value of key {key!r} is a {type(value).__name__}: {_ACCEPTED}"
            )
    return obj


def load_dictionary_file(path: str | Path) -> dict[str, Any]:
    """Load one dictionary from ``.json`` or ``.pkl`` (restricted unpickler) and validate it.

    Returns a plain dict of str to int, float or str (NumPy scalars become Python numbers).
    Raises :class:`DictionaryError` for a missing file, an unknown suffix or a wrong content,
    and :class:`UnsafePickleError` for a pickle that asks for any other class or function.
    """
    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"dictionary file {path} does not exist; check the path")
    if path.suffix == ".json":
        with path.open("rb") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise DictionaryError(f"{path} is not valid JSON: {e}") from e
    elif path.suffix == ".pkl":
        with path.open("rb") as f:
            try:
                obj = _RestrictedUnpickler(f, path).load()
            except UnsafePickleError:
                raise
            except Exception as e:  # truncated or corrupt pickles raise many types
                raise DictionaryError(f"{path} is not a readable pickle: {e}") from e
    else:
        raise DictionaryError(f"{path}: unknown dictionary format; expected .json or .pkl")
    return _validate(obj, path)


def _find(directory: Path, prefix: str, required: bool) -> Path | None:
    """The file in ``directory`` named ``prefix*.json`` (preferred) or ``prefix*.pkl``."""
    for suffix in (".json", ".pkl"):
        found = sorted(directory.glob(f"{prefix}*{suffix}"))
        if len(found) > 1:
            raise DictionaryError(
                f"{directory} holds several {prefix}*{suffix} files ({[p.name for p in found]}); "
                "keep one set of dictionaries per directory"
            )
        if found:
            return found[0]
    if required:
        raise DictionaryError(
            f"{directory} has no {prefix}*.json or {prefix}*.pkl; point the path at a directory "
            "holding a Geneformer dictionary set (e.g. <shared>/geneformer/v2)"
        )
    logger.warning("%s has no %s*.json/.pkl; using an empty mapping", directory, prefix)
    return None


@dataclass(frozen=True)
class GeneformerDictionaries:
    """The four Geneformer dictionaries of one release (V1 = gc30M, V2 = gc104M)."""

    token_dictionary: dict[str, int]
    """Token -> id; special tokens (``<pad>``, ``<mask>``, V2: ``<cls>``, ``<eos>``) first."""
    gene_medians: dict[str, float]
    """Ensembl ID -> non-zero median of depth-normalised expression."""
    gene_name_id: dict[str, str]
    """Gene symbol -> Ensembl ID (empty if the file is absent)."""
    ensembl_mapping: dict[str, str]
    """Upper-cased symbol / alias / retired ID -> Ensembl ID (empty if absent)."""
    source: str
    """The directory the dictionaries were read from."""
    version: Literal["v1", "v2"]
    """``"v2"`` iff the token dictionary has ``<cls>``."""

    @classmethod
    def load(cls, path: str | Path) -> GeneformerDictionaries:
        """Load the dictionaries from a directory (``token_dictionary*``, ``gene_median_dictionary*``,
        optional ``gene_name_id_dict*`` and ``ensembl_mapping_dict*``; JSON preferred)."""
        directory = Path(path)
        if not directory.is_dir():
            raise DictionaryError(
                f"Geneformer dictionary directory {directory} does not exist; pass the folder "
                "holding token_dictionary*.json etc. (e.g. <shared>/geneformer/v2)"
            )
        loaded: dict[str, dict[str, Any]] = {}
        for prefix, required in (
            ("token_dictionary", True),
            ("gene_median_dictionary", True),
            ("gene_name_id_dict", False),
            ("ensembl_mapping_dict", False),
        ):
            file = _find(directory, prefix, required)
            loaded[prefix] = load_dictionary_file(file) if file is not None else {}
        tokens, medians = loaded["token_dictionary"], loaded["gene_median_dictionary"]
        for name, d, kind in (("token", tokens, int), ("median", medians, (int, float))):
            bad = next((k for k, v in d.items() if not isinstance(v, kind)), None)
            if bad is not None:
                raise DictionaryError(
                    f"{directory}: {name} dictionary value for {bad!r} is {d[bad]!r}, "
                    f"expected a {'int' if kind is int else 'number'}"
                )
        return cls(
            token_dictionary=tokens,
            gene_medians={k: float(v) for k, v in medians.items()},
            gene_name_id=loaded["gene_name_id_dict"],
            ensembl_mapping=loaded["ensembl_mapping_dict"],
            source=str(directory),
            version="v2" if "<cls>" in tokens else "v1",
        )

    def vocabulary_arrays(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Genes eligible for tokenisation: in the token dictionary and with a median.

        Returns ``(ensembl_ids, token_ids, medians)`` sorted by Ensembl ID: a list of n str,
        int32 array (n,), float64 array (n,). Special tokens (``<...>``) are excluded.
        """
        tokens = pl.DataFrame(
            {
                "ensembl_id": list(self.token_dictionary),
                "token": list(self.token_dictionary.values()),
            },
            schema={"ensembl_id": pl.String, "token": pl.Int32},
        ).filter(~pl.col("ensembl_id").str.starts_with("<"))
        medians = pl.DataFrame(
            {"ensembl_id": list(self.gene_medians), "median": list(self.gene_medians.values())},
            schema={"ensembl_id": pl.String, "median": pl.Float64},
        )
        genes = tokens.join(medians, on="ensembl_id", how="inner").sort("ensembl_id")
        return (
            genes["ensembl_id"].to_list(),
            genes["token"].to_numpy().astype(np.int32, copy=False),
            genes["median"].to_numpy().astype(np.float64, copy=False),
        )
