"""What the tests and benchmarks share; the toolkit itself never imports it.

- `datagen`: small data in the real file formats (idx.gz, CIFAR tarballs, ImageFolder, shards of synthetic images)
  and tiny random-weight diffusion models, made offline.
- `reference`: the naive per-group loop (autograd on each group alone, clip, sum) that the engines are checked
  against.
- `exactness`: the layer-wise engine equals that reference, or its constructor refuses.
- `zoo`: timm's architecture families at tiny size, and the check each must pass.
"""
