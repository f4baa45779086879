"""Reward transforms (`qprobe.transforms`): calibration of a known reward list worked by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qprobe.errors import QProbeError
from qprobe.transforms import calibrate, parse_transform, transform_rewards

ROOT = Path(__file__).resolve().parents[1]



# ---------------------------------------------------------------- calibration
def test_calibration_of_a_known_reward_list():
    r = [0, 1, 0, 0, 1, 1, 1, 1, 0, 0.5, 1]
    g = ["a"] * 4 + ["b"] * 4 + ["c"] * 3
    want = [1 / 3, 1.0, 1 / 3, 1 / 3,  # a lone pass outranks its 3 fails; a fail ties 2 of 3 others
            0.5, 0.5, 0.5, 0.5,  # everything passes: a pass is the median
            0.0, 0.5, 1.0]
    np.testing.assert_allclose(calibrate(r, g), want)
    np.testing.assert_allclose(transform_rewards("calibrated", r, g), want)
    np.testing.assert_allclose(transform_rewards("calibrated-exp:2", r, g), np.expm1(2 * np.array(want)) / np.expm1(2))
    np.testing.assert_allclose(transform_rewards("none", r, g), r)


def test_calibration_of_a_demonstration_against_the_base_samples_only():
    r = [0, 1, 0, 0, 1]  # the last row is a demonstration of the same prompt
    c = calibrate(r, [0] * 5, reference=[True] * 4 + [False])
    np.testing.assert_allclose(c, [1 / 3, 1.0, 1 / 3, 1 / 3, (3 + 0.5) / 4])


@pytest.mark.parametrize("spec", ["calibrated-exp", "calibrated-exp:0", "calibrated-exp:x", "rank", "calibrated-exp:inf"])
def test_bad_transform_is_one_clear_error(spec):
    with pytest.raises(QProbeError, match="expected none, calibrated or calibrated-exp:T"):
        parse_transform(spec)
