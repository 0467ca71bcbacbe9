"""Private fine-tuning of a timm backbone with DP-SGD (`--help` explains; dpmix_dist/commands/finetune.py).

accelerate launch launch/finetune.py --config fmnist_effnet_lite0 privacy.target_epsilon=2
"""

import sys

from dpmix_dist.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
