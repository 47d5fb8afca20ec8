"""The measuring tools under bench/ that published figures rest on."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.parametrize("dim", [4, 12])
def test_twonn_finds_the_dimension_of_a_flat_manifold(dim):
    """Gaussian points in a random `dim`-dimensional subspace of R^64: the estimate is `dim`."""
    from intrinsic_dim import prepared, twonn

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, dim)))[0]
    x = rng.standard_normal((20_000, dim)) @ basis.T + 5.0  # offset: centring is part of the recipe
    est = twonn(prepared(x), 2000, rng)
    assert abs(est - dim) < 0.2 * dim + 0.5, est


def test_scale_features_have_a_low_intrinsic_dimension():
    """The scale bench's modes vary along LOCAL directions: their ID sits far below that of the
    same generator with isotropic within-mode noise (LOCAL = R)."""
    import scale
    from intrinsic_dim import prepared, twonn

    y = torch.arange(200).repeat_interleave(40)
    ids = {}
    for local in (scale.LOCAL, scale.R):
        x = scale.Generator(200, seed=0, local=local).draw(y).numpy()
        ids[local] = twonn(prepared(x), 2000, np.random.default_rng(0))
    assert ids[scale.LOCAL] < 40 < ids[scale.R], ids
