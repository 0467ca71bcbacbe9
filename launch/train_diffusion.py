"""Train the offline diffusion generator on PUBLIC images (`--help` explains; dpmix_dist/commands/train_generator.py).

python launch/train_diffusion.py --config fmnist_ddpm
"""

import sys

from dpmix_dist.commands.train_generator import main

if __name__ == "__main__":
    sys.exit(main())
