"""GradientSpace: cluster instruction-tuning data by exact per-sample LoRA gradients.

Python API (mirrors the CLI):

    from gradientspace import load_config, cluster, train_experts, train_routers, evaluate_strategies, run_all
    config = load_config("configs/demo.yaml", {"cluster.k": 4, "out": "runs/mine"})
    outcome = cluster(config)           # gradientspace cluster
    train_experts(config)               # gradientspace train-experts RUN
    train_routers(config)               # gradientspace train-router RUN
    results = evaluate_strategies(config)   # gradientspace evaluate RUN
    # or all of it: run_all(config)     # gradientspace run CONFIG
"""

from gradientspace.clustering.stages import ClusterOutcome, cluster
from gradientspace.commands import run_all
from gradientspace.config import RunConfig, config_from_run, load_config
from gradientspace.evaluation.evaluate import evaluate_strategies
from gradientspace.experts.adapters import train_experts
from gradientspace.routing.model import StrategyModel
from gradientspace.routing.router import train_routers

__all__ = [
    "RunConfig",
    "load_config",
    "config_from_run",
    "cluster",
    "ClusterOutcome",
    "train_experts",
    "train_routers",
    "StrategyModel",
    "evaluate_strategies",
    "run_all",
]
__version__ = "0.1.0"
