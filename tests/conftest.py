"""Shared test setup: deterministic seeds, hypothesis profile, small helpers."""
import importlib.util
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


# PaddleDetection is an optional part: the core's tests (tests/core) also run in an environment without it,
# where the tests marked `ppdet` are deselected. PPFUSE_REQUIRE_PPDET=1 (CI's full environment) makes a missing
# ppdet an error instead, so a broken install cannot pass by deselecting.
HAVE_PPDET = importlib.util.find_spec("ppdet") is not None


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs (every detector family exported and run in Paddle "
                            "Inference); not in the default run, select with -m slow")
    config.addinivalue_line("markers", "ppdet: needs PaddleDetection; deselected where it is not installed")
    if os.environ.get("PPFUSE_REQUIRE_PPDET") == "1" and not HAVE_PPDET:
        raise pytest.UsageError("PPFUSE_REQUIRE_PPDET=1 but ppdet cannot be imported: install it "
                                "(bash scripts/setup_env.sh)")


def _deselect(config, items, keep):
    dropped = [item for item in items if not keep(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if keep(item)]


def pytest_collection_modifyitems(config, items):
    """Without ``-m``, slow tests are deselected (not skipped): ``pytest tests`` is CI's run, ``pytest -m slow
    tests`` the long one. Without ppdet, tests marked ``ppdet`` are deselected."""
    if not HAVE_PPDET:
        _deselect(config, items, lambda item: not item.get_closest_marker("ppdet"))
    if config.getoption("markexpr"):
        return
    _deselect(config, items, lambda item: not item.get_closest_marker("slow"))
