"""One-run privacy audit: train once with canaries, bound ε from below (`--help`; dpmix_dist/commands/audit.py).

python launch/audit.py --config fmnist_effnet_lite0 --gradient-canaries 5000 --input-canaries 1000
"""

import sys

from dpmix_dist.commands.audit import main

if __name__ == "__main__":
    sys.exit(main())
