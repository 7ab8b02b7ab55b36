"""GradientSpace: cluster instruction-tuning data by exact per-sample LoRA gradients.

Python API (mirrors the CLI):

    from gradientspace import load_config, cluster
    config = load_config("configs/demo.yaml", {"cluster.k": 4, "out": "runs/mine"})
    outcome = cluster(config)
"""

from .config import RunConfig, load_config
from .pipeline import ClusterOutcome, cluster

__all__ = ["RunConfig", "load_config", "cluster", "ClusterOutcome"]
__version__ = "0.1.0"
