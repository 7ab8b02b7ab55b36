"""The gradient space: the per-sample LoRA gradient engine, the online SVD sketch and the consumers of the gradient stream."""
