"""Data: table readers (CSV, TSV, JSON, JSONL, parquet, restricted pickles), the built-in headlines, unlabelled
texts, splits, tokenization and its cache, and batching. Imports config, errors and fileio only."""
