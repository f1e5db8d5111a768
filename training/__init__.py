"""ift training: DeepSpeed config building, batching, the per-worker loop and the train job."""
