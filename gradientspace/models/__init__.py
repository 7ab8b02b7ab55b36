"""Base models and their adapters: offline aliases, devices, LoRA wrapping, and the model that serves every strategy's adapters."""
