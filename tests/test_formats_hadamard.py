"""The 16x16 random Hadamard transform: orthonormal, invertible, the recipe's matrix."""

import pytest
import torch

import independent_nvfp4 as ind
from rayfp4.formats import hadamard


def test_matrix_is_the_recipes_and_orthonormal():
    h = hadamard.rht_matrix().double()
    assert torch.allclose(h @ h.T, torch.eye(16, dtype=torch.float64), atol=0, rtol=0)
    h16 = hadamard.sylvester_hadamard(16)
    s = torch.tensor(hadamard.DEFAULT_SIGNS, dtype=torch.float32)
    assert torch.equal(hadamard.rht_matrix(), torch.diag(s) @ h16 / 4)
    assert hadamard.DEFAULT_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    # Sylvester order: row i, column j is (-1)^popcount(i & j).
    for i in range(16):
        for j in range(16):
            assert h16[i, j].item() == (-1) ** bin(i & j).count("1")


def test_butterfly_equals_dense_product_and_independent_loop():
    x = torch.randn(64, 256, dtype=torch.float64)
    dense = (x.reshape(64, 16, 16) @ hadamard.rht_matrix().double()).reshape(64, 256)
    got = hadamard.rht(x.float())
    # FP32 butterfly vs exact product: within FP32 rounding of a 16-term sum.
    assert torch.allclose(got.double(), dense, rtol=0, atol=1e-6 * x.abs().max().item())
    # Bit for bit against the independently written textbook loop in numpy.
    want = ind.fwht16_f32(x.float().numpy().reshape(64, 16, 16)).reshape(64, 256)
    assert torch.equal(got, torch.from_numpy(want))


def test_invertible_and_norm_preserving():
    x = torch.randn(32, 128)
    y = hadamard.rht(x)
    assert torch.allclose(hadamard.inverse_rht(y), x, atol=1e-6)
    tiles = lambda t: t.reshape(32, 8, 16).norm(dim=-1)
    assert torch.allclose(tiles(y), tiles(x), rtol=1e-5)
    # An outlier is spread evenly over its tile: every entry becomes +-outlier / 4.
    z = torch.zeros(1, 16)
    z[0, 5] = 8.0
    assert torch.equal(hadamard.rht(z).abs(), torch.full((1, 16), 2.0))


def test_cancels_in_a_product_along_k():
    a, b = torch.randn(8, 64, dtype=torch.float64), torch.randn(12, 64, dtype=torch.float64)
    h = torch.block_diag(*[hadamard.rht_matrix().double()] * 4)
    assert torch.allclose((a @ h) @ (b @ h).T, a @ b.T, atol=1e-12)
    assert torch.allclose(hadamard.rht(a.float()).double() @ hadamard.rht(b.float()).double().T,
                          a @ b.T, atol=1e-4)


def test_random_signs_option():
    s = hadamard.random_signs(0)
    assert torch.equal(s, hadamard.random_signs(0)) and set(s.tolist()) <= {-1.0, 1.0}
    x = torch.randn(4, 32)
    assert torch.allclose(hadamard.inverse_rht(hadamard.rht(x, s), s), x, atol=1e-6)
    with pytest.raises(ValueError, match="16 entries"):
        hadamard.rht(x, torch.ones(8))


@pytest.mark.parametrize("shape,match", [((4, 24), r"last dimension \(24\)"), ((16,), "2-D")])
def test_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        hadamard.rht(torch.ones(shape))
