"""Box-format converters: known values, round trips, and numpy and torch giving the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pillsnap.utils.boxes import cxcywh_to_xyxy, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh

# One box, 10 px from the left, 20 px from the top, 30 wide and 40 high, in all three formats.
XYWH = [10.0, 20.0, 30.0, 40.0]
XYXY = [10.0, 20.0, 40.0, 60.0]
CXCYWH = [25.0, 40.0, 30.0, 40.0]

CONVERTERS = [
    (xywh_to_xyxy, XYWH, XYXY),
    (xyxy_to_xywh, XYXY, XYWH),
    (cxcywh_to_xyxy, CXCYWH, XYXY),
    (xyxy_to_cxcywh, XYXY, CXCYWH),
]


@pytest.mark.parametrize(("convert", "given", "expected"), CONVERTERS)
def test_known_example(convert, given, expected) -> None:
    np.testing.assert_array_equal(convert(np.array(given)), expected)
    assert convert(torch.tensor(given)).tolist() == expected
    np.testing.assert_array_equal(convert(given), expected)  # a plain list works too (as numpy)


def random_xyxy(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    corner = rng.uniform(0, 500, shape + (2,))
    size = rng.uniform(0.5, 200, shape + (2,))
    return np.concatenate([corner, corner + size], -1)


@pytest.mark.parametrize("shape", [(0,), (1,), (17,), (3, 5)])
def test_round_trips(shape) -> None:
    xyxy = random_xyxy(0, shape)
    np.testing.assert_allclose(xywh_to_xyxy(xyxy_to_xywh(xyxy)), xyxy, rtol=0, atol=1e-9)
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, rtol=0, atol=1e-9)
    # Between the two size-based formats, through xyxy.
    xywh = xyxy_to_xywh(xyxy)
    np.testing.assert_allclose(xyxy_to_xywh(cxcywh_to_xyxy(xyxy_to_cxcywh(xywh_to_xyxy(xywh)))), xywh, atol=1e-9)


@pytest.mark.parametrize(("convert", "_given", "_expected"), CONVERTERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_and_torch_agree(convert, _given, _expected, dtype) -> None:
    boxes = random_xyxy(1, (4, 6))
    from_numpy = convert(boxes)
    from_torch = convert(torch.tensor(boxes, dtype=dtype))
    assert isinstance(from_numpy, np.ndarray) and from_numpy.shape == (4, 6, 4)
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == dtype and from_torch.shape == (4, 6, 4)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    np.testing.assert_allclose(from_torch.numpy(), from_numpy, rtol=0, atol=tolerance)


def test_integer_boxes_become_float_without_truncation() -> None:
    centre = xyxy_to_cxcywh(np.array([[0, 0, 3, 5]]))
    assert centre.dtype == np.float64 and centre.tolist() == [[1.5, 2.5, 3.0, 5.0]]
    assert xyxy_to_cxcywh(torch.tensor([[0, 0, 3, 5]])).tolist() == [[1.5, 2.5, 3.0, 5.0]]


def test_torch_keeps_device_and_gradient() -> None:
    boxes = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    xywh_to_xyxy(boxes).sum().backward()
    assert boxes.grad.tolist() == [[2.0, 2.0, 1.0, 1.0]]


def test_wrong_last_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        xywh_to_xyxy(np.zeros((3, 5)))
