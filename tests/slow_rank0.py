"""`gradientspace.cli` with rank 0's cluster stage slowed down on purpose (run under torchrun by test_distributed.py).

If any rank read the clusters before rank 0 had written them, this makes it happen every time rather
than only on a slow machine: the stages must wait for each other, not win a race.
"""

import sys
import time

from gradientspace import distributed
from gradientspace.cli import main
from gradientspace.clustering.stages import ClusterStage

DELAY_SECONDS = 5
unhurried = ClusterStage.run


def delayed(self, run, key, record):
    if distributed.is_main():
        time.sleep(DELAY_SECONDS)
    return unhurried(self, run, key, record)


ClusterStage.run = delayed
sys.exit(main(sys.argv[1:]))
