"""Genes: the offline gene table and name mapping, vocabularies, Geneformer dictionaries.

- :class:`GeneTable` maps symbols / Ensembl IDs to Ensembl IDs (a :class:`GeneMapping`),
  and gives biotypes and mitochondrial flags; :class:`MyGeneMapper` adds MyGene.info.
- :func:`build_vocabulary`, :func:`save_token_dictionary`, :func:`load_token_dictionary`
  keep the Geneformer token layout (special tokens, then genes sorted by Ensembl ID).
- :class:`GeneformerDictionaries` imports the published dictionaries (JSON, or pickles
  through a restricted unpickler).
"""

from cellfoundry.genes.dictionaries import (
    DictionaryError,
    GeneformerDictionaries,
    UnsafePickleError,
    load_dictionary_file,
)
from cellfoundry.genes.mapping import (
    ENSEMBL_PATTERN,
    GeneMapping,
    MyGeneMapper,
    ensembl_expr,
    normalize_ensembl,
)
from cellfoundry.genes.table import GeneTable, GeneTableError
from cellfoundry.genes.vocab import (
    SPECIAL_TOKENS_V1,
    SPECIAL_TOKENS_V2,
    VocabularyError,
    build_vocabulary,
    load_token_dictionary,
    save_token_dictionary,
    special_tokens,
    validate_token_dictionary,
)

__all__ = [
    "ENSEMBL_PATTERN",
    "SPECIAL_TOKENS_V1",
    "SPECIAL_TOKENS_V2",
    "DictionaryError",
    "GeneMapping",
    "GeneTable",
    "GeneTableError",
    "GeneformerDictionaries",
    "MyGeneMapper",
    "UnsafePickleError",
    "VocabularyError",
    "build_vocabulary",
    "ensembl_expr",
    "load_dictionary_file",
    "load_token_dictionary",
    "normalize_ensembl",
    "save_token_dictionary",
    "special_tokens",
    "validate_token_dictionary",
]
