"""Data preparation: raw files -> templated, split, tokenized and packed Parquet shards."""
