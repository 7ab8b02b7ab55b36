"""The stages a strategy asks for by what they give (`strategies.PipelineStages`): clusters, the sketch, its served adapters,
its router and threshold, the ensemble's centroids; `serving_stages`, every stage whose output serving a strategy reads."""

from __future__ import annotations

from gradientspace.clustering.stages import ClusterStage, GradientStage
from gradientspace.experts.strategies import get
from gradientspace.routing.ensemble import CentroidStage
from gradientspace.routing.keep import served_stage
from gradientspace.routing.router import RouterStage
from gradientspace.routing.threshold import ThresholdStage, thresholds_chosen
from gradientspace.runner import Run
from gradientspace.runs import Stage


class PipelineStages:
    """The stages a strategy asks for by what they give (`strategies.PipelineStages`), for one run."""

    def __init__(self, run: Run):
        self.run = run

    def clusters(self) -> Stage:
        return ClusterStage()

    def gradients(self) -> Stage:
        return GradientStage()

    def served(self, strategy: str) -> Stage:
        return served_stage(self.run, strategy)

    def router(self, strategy: str) -> list[Stage]:
        return [RouterStage(strategy)] + ([ThresholdStage(strategy)] if thresholds_chosen(self.run) else [])

    def centroids(self) -> Stage:
        return CentroidStage()


def serving_stages(run: Run, strategy: str) -> list[Stage]:
    """Every stage whose output serving `strategy` reads, as the strategy says (`Strategy.serving_stages`)."""
    return get(strategy).serving_stages(PipelineStages(run))
