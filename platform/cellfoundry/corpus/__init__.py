"""Stage 1: the corpus pipeline on Ray Data (catalog, ingest, QC, dedup, medians, tokenize)."""
