"""What the tests and benchmarks share; the toolkit itself never imports it.

- `datagen`: small data in the real file formats (idx.gz, CIFAR tarballs, ImageFolder, shards of synthetic images)
  and tiny random-weight diffusion models, made offline.
"""
