"""Problems, benchmarks, prompts and the samples' Parquet schema."""
