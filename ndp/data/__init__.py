"""Data readers: Criteo TSV, preprocessed columnar shards, synthetic power-law data."""
