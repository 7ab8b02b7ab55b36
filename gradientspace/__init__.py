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

from importlib import import_module

# the registries the config reads its choices and defaults from (`experts.strategies`, `evaluate.metrics`): imported
# with the package, so that `load_config` and `gradientspace config-keys` know them whatever else was imported
import gradientspace.evaluation.metrics  # noqa: F401
import gradientspace.experts.strategies  # noqa: F401

# name → the module that defines it, imported on first use: a process that needs one light module (a launcher's
# child, `gradientspace.config`) does not pay seconds for torch, transformers and peft
_API = {
    "RunConfig": "gradientspace.config",
    "load_config": "gradientspace.config",
    "config_from_run": "gradientspace.config",
    "cluster": "gradientspace.clustering.stages",
    "ClusterOutcome": "gradientspace.clustering.stages",
    "train_experts": "gradientspace.experts.adapters",
    "train_routers": "gradientspace.routing.router",
    "StrategyModel": "gradientspace.routing.model",
    "evaluate_strategies": "gradientspace.evaluation.evaluate",
    "run_all": "gradientspace.commands",
}
__all__ = list(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'gradientspace' has no attribute {name!r}")
    value = getattr(import_module(_API[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
