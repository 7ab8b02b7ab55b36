"""The adapters: each strategy's partition, the generalist and its branched experts, their training, and the keep / blend / fall-back decision."""
