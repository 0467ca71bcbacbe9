"""Top-k classes of image files from a private model (`--help` explains; dpmix_dist/commands/predict.py).

python launch/predict.py --model runs/RUN image.png            # a finished run's folder
python launch/predict.py --model models:/fmnist-effnet-lite0/1 image.png
"""

import sys

from dpmix_dist.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
