"""Write a data set as WebDataset shards (train/test) plus metadata.json, for launch/finetune.py.

    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist            # Debian package folder
    python launch/prepare_data.py cifar10 --out data/cifar10                         # downloads (torchvision)
    python launch/prepare_data.py cifar100 --source cifar-100-python.tar.gz --out data/cifar100
    python launch/prepare_data.py imagefolder --source DIR --image-size 64 --out data/mine

    # Split the train split: a public part (for the diffusion generator, DP-Mix_Diff) and the private rest
    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist \
        --public-out data/fashion_mnist_public --public-count 10000

With --public-out, --out holds only the private part of the train split (what fine-tuning may use) and
--public-out the disjoint public part; both hold the test split, and both record the split in metadata.json
("split": role, seed, counts, SHA-256 of the source indices of either part) and in source_indices.npy.
The output folders appear only when complete; existing ones are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hashlib
import io

import numpy as np

from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import (
    FASHION_MNIST_DEFAULT_DIR, SPLIT_INDICES, DataError, read_cifar, read_fashion_mnist, read_image_folder,
    split_public_private,
)  # fmt: skip


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _digest(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()


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
    parser.add_argument("--public-out", type=Path, default=None,
                        help="also write a disjoint public part of the train split here (see above)")
    parser.add_argument("--public-count", type=int, default=None, help="examples in the public part (with --public-out)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the public/private split (it is public)")
    args = parser.parse_args(argv)
    try:
        if args.image_size is not None and (args.dataset != "imagefolder" or args.image_size < 1):
            raise DataError("--image-size N (N >= 1) applies to imagefolder only; the other data sets keep their size")
        if (args.public_out is None) != (args.public_count is None):
            raise DataError("--public-out DIR and --public-count N go together (the public part and its size)")
        if args.public_out is not None and args.public_out.resolve() == args.out.resolve():
            raise DataError("--public-out must differ from --out: the public and private parts live in separate folders")
        for out in (args.out, args.public_out):
            if out is not None and out.exists() and not args.overwrite:
                raise DataError(f"{out} already exists; pass --overwrite to replace it")
        if args.dataset == "fashion_mnist":
            dataset = read_fashion_mnist(args.source or FASHION_MNIST_DEFAULT_DIR)
        elif args.dataset in ("cifar10", "cifar100"):
            dataset = read_cifar(10 if args.dataset == "cifar10" else 100, args.source, args.download_dir)
        else:
            if args.source is None:
                raise DataError("imagefolder needs --source ROOT")
            dataset = read_image_folder(args.source, args.image_size)
        if args.public_out is None:
            written = [(write_dataset(dataset, args.out, overwrite=args.overwrite), dataset)]
        else:
            private, public, private_idx, public_idx = split_public_private(dataset, args.public_count, args.split_seed)
            split = {
                "source_split": "train",
                "source_num_examples": int(len(private_idx) + len(public_idx)),
                "split_seed": args.split_seed,
                "public_count": int(len(public_idx)),
                "private_count": int(len(private_idx)),
                "public_indices_sha256": _digest(public_idx),
                "private_indices_sha256": _digest(private_idx),
                "indices_file": SPLIT_INDICES,
            }
            written = []
            for role, part, idx, out, partner in (("private", private, private_idx, args.out, args.public_out),
                                                  ("public", public, public_idx, args.public_out, args.out)):
                extra = {"split": {"role": role, "partner": str(partner), **split}}
                root = write_dataset(part, out, overwrite=args.overwrite, extra=extra,
                                     extra_files={SPLIT_INDICES: _npy(idx)})
                written.append((root, part))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for root, part in written:
        counts = {s: len(r.labels) for s, r in part.splits.items()}
        print(f"wrote {root}: {part.name}, {len(part.classes)} classes, {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
