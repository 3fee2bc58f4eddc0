"""The Outlier Exposure term against its float64 definition: CE from softmax(z_out) to uniform."""

import math

import pytest
import torch

from lossbench.losses import OutlierExposureLoss, uniform_cross_entropy


def test_matches_cross_entropy_to_uniform():
    g = torch.Generator().manual_seed(0)
    z_out = torch.randn(6, 5, generator=g, dtype=torch.float64) * 4
    z_in = torch.randn(3, 5, generator=g, dtype=torch.float64)
    ref = []
    for row in z_out.tolist():
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        ref.append(-sum((v - lse) for v in row) / len(row))  # -(1/C) sum_c log softmax_c
    ref = torch.tensor(ref, dtype=torch.float64)
    torch.testing.assert_close(uniform_cross_entropy(z_out), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(OutlierExposureLoss()(z_in, z_out), 0.5 * ref.mean(), rtol=1e-12, atol=1e-12)
    # minimum log C at equal logits
    torch.testing.assert_close(uniform_cross_entropy(torch.full((2, 5), 3.0, dtype=torch.float64)),
                               torch.full((2,), math.log(5), dtype=torch.float64))


def test_gradcheck_and_errors():
    z_out = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z_in = torch.randn(2, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: OutlierExposureLoss(0.5)(z_in, t), (z_out,))
    with pytest.raises(ValueError, match="same number of classes"):
        OutlierExposureLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits_out is empty"):
        OutlierExposureLoss()(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="weight"):
        OutlierExposureLoss(weight=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_a_float32_value(dtype):
    """The value was cast back to the input's dtype: fp16 overflows past 65504 (here 9e4 -> inf)."""
    z = torch.tensor([[6e4, -6e4, -6e4, -6e4], [1.0, 2.0, 3.0, 4.0]]).to(dtype)
    out = OutlierExposureLoss(weight=1.0)(z, z)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    ref = OutlierExposureLoss(weight=1.0)(z.double(), z.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    assert OutlierExposureLoss()(z.double(), z.double()).dtype == torch.float64
