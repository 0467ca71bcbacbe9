"""Accuracy against ε: run a config at several ε (× methods × replicates) as nested MLflow runs under one parent.

    python launch/sweep.py --config fmnist_effnet_lite0 --epsilons 1,2,4,8
    python launch/sweep.py --config NAME --epsilons 1,8 --methods dpsgd,self_aug --non-private dpsgd --seeds 0,1

`--help` explains every option; the logic lives in dpmix_dist/sweep.py.
"""

from __future__ import annotations

import sys

from dpmix_dist.sweep import run_from_command_line

if __name__ == "__main__":
    sys.exit(run_from_command_line())
