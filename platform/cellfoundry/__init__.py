"""cellfoundry: Geneformer-style single-cell foundation models on Ray."""

__version__ = "0.1.0"
