"""Write a data set as WebDataset shards plus metadata.json, optionally split into public and private parts
(`--help` explains; dpmix_dist/commands/prepare.py).

    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist --public-out data/fashion_mnist_public \
        --public-count 10000 --validation-count 2000
"""

import sys

from dpmix_dist.commands.prepare import main

if __name__ == "__main__":
    sys.exit(main())
