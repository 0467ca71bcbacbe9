"""Render synthetic images per class, DP-Mix_Diff's public pool (`--help` explains; dpmix_dist/commands/generate.py).

python launch/generate.py --config fmnist_ddpm               # offline: the generator of train_diffusion.py
accelerate launch launch/generate.py --config cifar100_sd    # Stable Diffusion, one slice per GPU
"""

import sys

from dpmix_dist.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
