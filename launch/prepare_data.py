"""Write a data set as WebDataset shards (train/test) plus metadata.json, for launch/finetune.py.

    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist            # Debian package folder
    python launch/prepare_data.py cifar10 --out data/cifar10                         # downloads (torchvision)
    python launch/prepare_data.py cifar100 --source cifar-100-python.tar.gz --out data/cifar100
    python launch/prepare_data.py imagefolder --source DIR --image-size 64 --out data/mine

The output folder appears only when complete; an existing one is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import (
    FASHION_MNIST_DEFAULT_DIR, DataError, read_cifar, read_fashion_mnist, read_image_folder,
)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["fashion_mnist", "cifar10", "cifar100", "imagefolder"])
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--source", default=None,
        help=f"fashion_mnist: idx folder (default {FASHION_MNIST_DEFAULT_DIR}); cifar*: local python tarball "
        "(default: download); imagefolder: ROOT with train/CLASS/* and test/CLASS/*",
    )  # fmt: skip
    parser.add_argument("--image-size", type=int, default=None, help="imagefolder: resize every image to N×N")
    parser.add_argument("--download-dir", type=Path, default=Path("data/downloads"), help="cifar download cache")
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the new shards are complete")
    args = parser.parse_args(argv)
    try:
        if args.image_size is not None and (args.dataset != "imagefolder" or args.image_size < 1):
            raise DataError("--image-size N (N >= 1) applies to imagefolder only; the other data sets keep their size")
        if args.out.exists() and not args.overwrite:
            raise DataError(f"{args.out} already exists; pass --overwrite to replace it")
        if args.dataset == "fashion_mnist":
            dataset = read_fashion_mnist(args.source or FASHION_MNIST_DEFAULT_DIR)
        elif args.dataset in ("cifar10", "cifar100"):
            dataset = read_cifar(10 if args.dataset == "cifar10" else 100, args.source, args.download_dir)
        else:
            if args.source is None:
                raise DataError("imagefolder needs --source ROOT")
            dataset = read_image_folder(args.source, args.image_size)
        root = write_dataset(dataset, args.out, overwrite=args.overwrite)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {s: len(r.labels) for s, r in dataset.splits.items()}
    print(f"wrote {root}: {dataset.name}, {len(dataset.classes)} classes, {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
