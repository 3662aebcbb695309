"""Weight encoding shared by every chain backend (the Bittensor SDK's max-upscaling)."""

import pytest

from protocol.chain import u16_weights


def test_max_upscale_and_zero_drop():
    assert u16_weights([3, 1, 7], [0.5, 0.25, 0.0]) == ([3, 1], [65535, 32768])
    assert u16_weights([1, 2], [0.0, 0.0]) == ([], [])


@pytest.mark.parametrize(
    "uids, w", [([1, 1], [1.0, 1.0]), ([1], [-1.0]), ([1], [float("nan")]), ([1, 2], [1.0])]
)
def test_bad_weights(uids, w):
    with pytest.raises(ValueError):
        u16_weights(uids, w)
