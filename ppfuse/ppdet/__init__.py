"""PaddleDetection integration: its layer types' converters, configs and models, detectors, post-processing,
and the export pipeline.

Importing this package imports ``ppdet`` and registers its layer types into
:data:`ppfuse.core.converters.DEFAULT_REGISTRY` (:mod:`ppfuse.ppdet.converters`).
"""
from ppfuse.errors import ConfigError

try:
    import ppdet  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(f"ppfuse.ppdet needs PaddleDetection, which cannot be imported ({exc}); install it with "
                      "`pip install 'ppfuse[ppdet]' && pip install --no-deps paddledet==2.6.0` (see docs/install.md)"
                      ) from exc

from ppfuse.ppdet import converters  # noqa: E402,F401  (registers ppdet's layer types)
