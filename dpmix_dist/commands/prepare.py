"""Write a data set as WebDataset shards (train/test) plus metadata.json, for launch/finetune.py.

    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist            # Debian package folder
    python launch/prepare_data.py cifar10 --out data/cifar10                         # downloads (torchvision)
    python launch/prepare_data.py cifar100 --source cifar-100-python.tar.gz --out data/cifar100
    python launch/prepare_data.py imagefolder --source DIR --image-size 64 --out data/mine

    # Split the train split: a public part (for the diffusion generator, DP-Mix_Diff) and the private rest
    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist \
        --public-out data/fashion_mnist_public --public-count 10000

    # ... plus a validation split carved from the PUBLIC part (for tuning), and a small private subset
    python launch/prepare_data.py fashion_mnist --out data/fashion_mnist \
        --public-out data/fashion_mnist_public --public-count 10000 --validation-count 2000 \
        --subset-out data/fashion_mnist_2k --subset-count 2000

With --public-out, --out holds only the private part of the train split (what fine-tuning may use) and
--public-out the disjoint public part; both hold the test split, and both record the partition in metadata.json
("partition": role, seed, counts, SHA-256 of the source indices of either part) and in source_indices.npy.
--validation-count V moves V public examples into a `validation` split written to every output folder (the public
folder's train split keeps the rest, so a generator trained on it never sees them); runs choose settings on it
with data.eval_split=validation, never on the test split. --subset-out writes a private folder whose train split
is --subset-count examples of the private part, at positions drawn from the split seed alone (data-independent),
recorded under "subset". All choices of indices depend only on --split-seed, which is public.
The output folders appear only when complete; existing ones are kept unless --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpmix_dist.data.prepare import PartitionRequest, write_partition
from dpmix_dist.data.shards import write_dataset
from dpmix_dist.data.sources import (
    FASHION_MNIST_DEFAULT_DIR,
    DataError,
    read_cifar,
    read_fashion_mnist,
    read_image_folder,
)
from dpmix_dist.errors import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["fashion_mnist", "cifar10", "cifar100", "imagefolder"])
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--source",
        default=None,
        help=f"fashion_mnist: idx folder (default {FASHION_MNIST_DEFAULT_DIR}); cifar*: local python tarball "
        "(default: download); imagefolder: ROOT with train/CLASS/* and test/CLASS/*",
    )
    parser.add_argument("--image-size", type=int, default=None, help="imagefolder: resize every image to N×N")
    parser.add_argument("--download-dir", type=Path, default=Path("data/downloads"), help="cifar download cache")
    parser.add_argument("--overwrite", action="store_true", help="replace --out once the new shards are complete")
    parser.add_argument(
        "--public-out",
        type=Path,
        default=None,
        help="also write a disjoint public part of the train split here (see above)",
    )
    parser.add_argument(
        "--public-count", type=int, default=None, help="examples in the public part (with --public-out)"
    )
    parser.add_argument(
        "--validation-count",
        type=int,
        default=None,
        help="with --public-out: public examples moved into a validation split (for tuning)",
    )
    parser.add_argument(
        "--subset-out",
        type=Path,
        default=None,
        help="with --public-out: also write a private folder holding --subset-count private examples",
    )
    parser.add_argument(
        "--subset-count", type=int, default=None, help="examples in the private subset (with --subset-out)"
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the public/private split, the validation carve and the subset (it is public)",
    )
    args = parser.parse_args(argv)
    return run_command(lambda: _prepare(args))


def _prepare(args: argparse.Namespace) -> int:
    if args.image_size is not None and (args.dataset != "imagefolder" or args.image_size < 1):
        raise DataError("--image-size N (N >= 1) applies to imagefolder only; the other data sets keep their size")
    if (args.public_out is None) != (args.public_count is None):
        raise DataError("--public-out DIR and --public-count N go together (the public part and its size)")
    if args.public_out is not None and args.public_out.resolve() == args.out.resolve():
        raise DataError("--public-out must differ from --out: the public and private parts live in separate folders")
    if args.public_out is None and (args.validation_count is not None or args.subset_out is not None):
        raise DataError(
            "--validation-count and --subset-out need --public-out (validation data is carved from the "
            "public part; the subset is of the private part)"
        )
    if (args.subset_out is None) != (args.subset_count is None):
        raise DataError("--subset-out DIR and --subset-count N go together (the subset's folder and its size)")
    outs = [o for o in (args.out, args.public_out, args.subset_out) if o is not None]
    if len({o.resolve() for o in outs}) != len(outs):
        raise DataError("--out, --public-out and --subset-out must be different folders")
    for out in outs:
        if out.exists() and not args.overwrite:
            raise DataError(f"{out} already exists; pass --overwrite to replace it")
    if args.dataset == "fashion_mnist":
        dataset = read_fashion_mnist(args.source or FASHION_MNIST_DEFAULT_DIR)
    elif args.dataset in ("cifar10", "cifar100"):
        dataset = read_cifar(10 if args.dataset == "cifar10" else 100, args.source, args.download_dir)
    elif args.source is None:
        raise DataError("imagefolder needs --source ROOT")
    else:
        dataset = read_image_folder(args.source, args.image_size)
    if args.public_out is None:
        written = [(write_dataset(dataset, args.out, overwrite=args.overwrite), dataset)]
    else:
        written = write_partition(
            dataset,
            PartitionRequest(
                args.out,
                args.public_out,
                args.public_count,
                args.validation_count,
                args.subset_out,
                args.subset_count,
                args.split_seed,
                args.overwrite,
            ),
        )
    for root, part in written:
        counts = {s: len(r.labels) for s, r in part.splits.items()}
        print(f"wrote {root}: {part.name}, {len(part.classes)} classes, {counts}")
    return 0
