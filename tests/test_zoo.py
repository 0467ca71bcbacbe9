"""timm's model zoo at tiny width and depth: for every architecture family, the layer-wise engine's clipped sum equals
the naive per-group loop for every trainable parameter, or its constructor refuses and the generic functorch engine
(the fallback of performance.engine=auto) equals it instead. Never wrong, never a failure in the middle of a step.

Trainable: all parameters, and the last stage / block + everything after it (final norm, head); K = 1 and 4 group
members. The families, and the check, are `dpmix_dist/testing/zoo.py`; `benchmarks/zoo_coverage.py` prints the
resulting coverage table.
"""

from __future__ import annotations

import pytest

from dpmix_dist.testing.zoo import FAMILIES, KNOWN_BAD_FALLBACK, LAYERWISE, FunctorchMismatch, check


@pytest.mark.parametrize(
    "name",
    [
        name
        if name not in KNOWN_BAD_FALLBACK
        else pytest.param(
            name, marks=pytest.mark.xfail(raises=FunctorchMismatch, strict=True, reason=KNOWN_BAD_FALLBACK[name])
        )
        for name in FAMILIES
    ],
)
def test_zoo_family_is_exact_or_falls_back(name):
    # "last" first: where the fallback is known to be wrong with all parameters trainable, "last" is still checked
    outcomes = {trainable: {check(name, trainable, k) for k in (1, 4)} for trainable in ("last", "all")}
    assert all(len(o) == 1 for o in outcomes.values()), outcomes  # K does not change what is accepted
    first = {trainable: refused[0] if refused else LAYERWISE for trainable, (refused,) in outcomes.items()}
    assert (first["all"], first["last"]) == FAMILIES[name].expected
