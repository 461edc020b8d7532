"""Shared test setup: deterministic seeds, hypothesis profile, small helpers."""
import os
import sys

import numpy as np
import paddle
import pytest
from hypothesis import HealthCheck, settings

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

settings.register_profile("ci", deadline=None, derandomize=False, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

# fp32 per-block tolerance of the re-parameterization claims
ATOL = 1e-5
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    paddle.seed(1234)
    np.random.seed(1234)


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    """Compare numbers with allclose semantics; the error message shows the max deviation."""
    actual = actual.numpy() if isinstance(actual, paddle.Tensor) else np.asarray(actual)
    expected = expected.numpy() if isinstance(expected, paddle.Tensor) else np.asarray(expected)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def scale_to_unit(y):
    """Divide by the output's largest magnitude so the tolerance is relative to the output's scale."""
    y = y.numpy() if isinstance(y, paddle.Tensor) else y
    return y / max(float(np.abs(y).max()), 1e-12)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs (every detector family exported and run in Paddle "
                            "Inference); not in the default run, select with -m slow")


def pytest_collection_modifyitems(config, items):
    """Without ``-m``, slow tests are deselected (not skipped): ``pytest tests`` is CI's run, ``pytest -m slow
    tests`` the long one."""
    if config.getoption("markexpr"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
