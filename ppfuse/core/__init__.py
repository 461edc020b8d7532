"""The core: re-parameterization and Conv+BN folding for any ``paddle.nn.Layer``.

Paddle only, never PaddleDetection. Lowest first: :mod:`kernels` (pure kernel math on tensors),
:mod:`layers` (the one place reading Paddle layer internals), :mod:`blocks` (RepVggBlock,
QARepVggBlock, the mixin), :mod:`registry` and :mod:`converters` (which converter for which layer
type), :mod:`dataflow` (what a traced program proves), :mod:`vouching` (what source reading
allows without a trace), :mod:`verify` (output comparison), :mod:`convert` (the walker),
:mod:`checkpoint` (safe checkpoint loading).
"""
