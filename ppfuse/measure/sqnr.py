"""How much int8 costs each deployed conv of an export: the signal-to-quantization-noise ratio (SQNR) of its
output and of its weights, as tables and a plot (``tools/quantization_error.py``).

    from ppfuse.measure import sqnr
    errors = sqnr.layer_errors(fp32_onnx, int8_onnx, feeds)   # per conv: output and weight SQNR in dB

The SQNR, in dB, of a tensor ``y`` against its fp32 reference ``r``:
``10 * log10(sum(r**2) / sum((y - r)**2))`` -- infinite when they are equal.
:func:`layer_errors` measures it for every conv's output (the int8 model's
dequantized output against the fp32 model's, over all images: the error
accumulated up to that layer) and for its weights alone, quantized per output
channel and per tensor (one scale for the whole kernel, which a
re-parameterized kernel with an outlier channel pays for on every other
channel). The int8 model is written by :mod:`ppfuse.deploy.quantize`; needs the
``[int8]`` extra.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ppfuse.deploy.quantize import (QuantizeSettings, calibration_images, calibration_inputs, model_feeds,
                                    constants_as_initializers, conv_nodes, quantize_onnx, require_quantization)
from ppfuse.errors import ConfigError
from ppfuse.export_format import INT8_ONNX_FILE, ONNX_FILE
from ppfuse.measure.results import table


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """``10 log10(sum(reference^2) / sum((actual - reference)^2))``; inf for equal arrays."""
    return _db(float(np.sum(np.square(reference, dtype="float64"))),
               float(np.sum(np.square(np.asarray(actual, "float64") - reference))))


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def fake_quantize_weight(weight: np.ndarray, per_channel: bool = True) -> np.ndarray:
    """``weight`` through symmetric int8 (scale ``max|w| / 127``, per output channel or for the whole tensor),
    back in float -- ONNX Runtime's quantization of int8 weights."""
    weight = np.asarray(weight, "float64")
    axes = tuple(range(1, weight.ndim)) if per_channel else None
    scale = np.max(np.abs(weight), axis=axes, keepdims=per_channel) / 127.0
    scale = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round(weight / scale), -127, 127) * scale


@dataclass
class LayerError:
    """One deployed conv: its output's SQNR in int8 vs fp32, and its weights' SQNR alone (dB)."""
    index: int
    name: str            # the conv's output tensor in model.onnx
    kernel: List[int]    # [out, in/groups, kh, kw]
    output_sqnr: float
    weight_sqnr_per_channel: float
    weight_sqnr_per_tensor: float


def _conv_weights(model) -> List[np.ndarray]:
    from onnx import numpy_helper
    tensors = {t.name: t for t in model.graph.initializer}
    weights = []
    for node in conv_nodes(model):
        if node.input[1] not in tensors:
            raise ConfigError(f"conv {node.output[0]}: its weight is computed, not stored; SQNR needs stored weights")
        weights.append(numpy_helper.to_array(tensors[node.input[1]]))
    return weights


def _with_outputs(model, names: Sequence[str]):
    from onnx import helper
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in present)
    return model.SerializeToString()


def _int8_output_names(model, conv_outputs: Sequence[str]) -> List[str]:
    """For each conv output of the fp32 model, the int8 model's tensor the next layer reads: the output of its
    DequantizeLinear (QuantizeLinear -> DequantizeLinear after the conv), else the conv's output itself."""
    consumers: Dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names = []
    for name in conv_outputs:
        quant = [n for n in consumers.get(name, []) if n.op_type == "QuantizeLinear"]
        dequant = [n for q in quant for n in consumers.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
        names.append(dequant[0].output[0] if dequant else name)
    return names


def layer_errors(fp32_path: str, int8_path: str, feeds: Sequence[Mapping[str, np.ndarray]],
                 threads: int = 2) -> List[LayerError]:
    """SQNR of every conv of the float model ``fp32_path``, in the QDQ model ``int8_path``, over ``feeds``.

    Output SQNR sums signal and noise over all images before the ratio. Both
    models run with ONNX Runtime's graph optimizations off: the int8 model's
    QDQ pairs then compute exactly the quantization they describe
    (fake-quantized float; fused int8 kernels agree with it up to rounding),
    and a model compared with itself gives an infinite SQNR.
    """
    require_quantization()
    import onnx
    import onnxruntime
    fp32 = constants_as_initializers(onnx.load(fp32_path))
    int8 = onnx.load(int8_path)
    convs = conv_nodes(fp32)
    if len(conv_nodes(int8)) != len(convs):
        raise ConfigError(f"{int8_path}: {len(conv_nodes(int8))} convs, {fp32_path} has {len(convs)}; "
                          "quantize this export again")
    reference_names = [n.output[0] for n in convs]
    int8_names = _int8_output_names(int8, reference_names)
    feeds = model_feeds(fp32, feeds)

    def session(model_bytes):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])

    reference_session = session(_with_outputs(fp32, reference_names))
    int8_session = session(_with_outputs(int8, int8_names))
    signal, noise = np.zeros(len(convs)), np.zeros(len(convs))
    for feed in feeds:
        reference = reference_session.run(reference_names, dict(feed))
        quantized = int8_session.run(int8_names, dict(feed))
        for i, (r, q) in enumerate(zip(reference, quantized)):
            r = r.astype("float64")
            signal[i] += np.sum(np.square(r))
            noise[i] += np.sum(np.square(q.astype("float64") - r))
    errors = []
    for i, (node, weight) in enumerate(zip(convs, _conv_weights(fp32))):
        errors.append(LayerError(i, node.output[0], list(weight.shape), _db(signal[i], noise[i]),
                                 sqnr_db(weight, fake_quantize_weight(weight, True)),
                                 sqnr_db(weight, fake_quantize_weight(weight, False))))
    return errors


@dataclass
class ModelErrors:
    """:func:`layer_errors` of one export, with the settings and images it was measured on."""
    model_dir: str
    layers: List[LayerError]
    settings: QuantizeSettings
    images: List[str] = field(default_factory=list)

    def summary(self, key: str) -> Dict[str, float]:
        """Median and worst (lowest) of one SQNR column, and which layer is worst."""
        values = np.array([getattr(layer, key) for layer in self.layers], "float64")
        worst = int(np.argmin(values))
        return {"median": float(np.median(values)), "worst": float(values[worst]), "worst_layer": worst}


def measure_export(model_dir: str, image_dir: str, settings: Optional[QuantizeSettings] = None,
                   threads: int = 2) -> ModelErrors:
    """Quantize an export into a temporary file (the export is left as it is) and measure :func:`layer_errors`
    on the calibration images themselves."""
    settings = settings or QuantizeSettings()
    settings.check()
    source = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(source):
        raise ConfigError(f"{model_dir}: no {ONNX_FILE}; export with --onnx (tools/export_deploy.py ... --onnx)")
    require_quantization()
    paths = calibration_images(image_dir, settings.images)
    feeds = calibration_inputs(model_dir, paths)
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, INT8_ONNX_FILE)
        quantize_onnx(source, target, feeds, settings)
        return ModelErrors(model_dir, layer_errors(source, target, feeds, threads), settings, paths)


# --- reporting --------------------------------------------------------------------------------------------------

COLUMNS = (("output_sqnr", "output int8 vs fp32"), ("weight_sqnr_per_channel", "weights per-channel"),
           ("weight_sqnr_per_tensor", "weights per-tensor"))


def _db_text(value: float) -> str:
    return "inf" if value == math.inf else "-inf" if value == -math.inf else f"{value:.1f}"


def summary_table(models: Sequence[ModelErrors], names: Sequence[str]) -> str:
    """Markdown: per model and SQNR kind, the median and the worst layer (index, kernel, dB)."""
    rows = []
    for name, model in zip(names, models):
        for key, title in COLUMNS:
            s = model.summary(key)
            worst = model.layers[s["worst_layer"]]
            rows.append([name, len(model.layers), title, _db_text(s["median"]), _db_text(s["worst"]),
                         f"{worst.index} `{worst.name}` {worst.kernel}"])
    return table(["model", "convs", "SQNR (dB) of", "median", "worst", "worst layer"], rows, "lrlrrl")


def layer_table(models: Sequence[ModelErrors], names: Sequence[str]) -> str:
    """Markdown: one row per conv (by index; the exports share their layout), SQNR columns per model."""
    head = ["conv", "kernel"] + [f"{name}: {title}" for name in names for _, title in COLUMNS]
    rows = []
    for i in range(max(len(m.layers) for m in models)):
        first = next(m.layers[i] for m in models if i < len(m.layers))
        cells = [str(i), "x".join(str(k) for k in first.kernel)]
        for model in models:
            layer = model.layers[i] if i < len(model.layers) else None
            cells += [_db_text(getattr(layer, key)) if layer else "" for key, _ in COLUMNS]
        rows.append(cells)
    return table(head, rows, "ll" + "r" * (len(head) - 2))


def plot_errors(models: Sequence[ModelErrors], names: Sequence[str], path: str) -> None:
    """A PNG: per-layer output SQNR of each model side by side (top), weight SQNR per channel and per tensor
    (bottom). Needs matplotlib (the ``[bench]`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the plot needs matplotlib: pip install -c constraints.txt -e \".[bench]\"") from None
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    width = 0.8 / len(models)
    finite = [layer.output_sqnr for model in models for layer in model.layers if math.isfinite(layer.output_sqnr)]
    ceiling = 1.1 * max(finite + [1.0])  # an infinite SQNR (int8 equal to fp32) is drawn hatched at this height
    for j, (name, model) in enumerate(zip(names, models)):
        x = np.arange(len(model.layers)) + (j - (len(models) - 1) / 2) * width
        bars = top.bar(x, [min(max(layer.output_sqnr, 0.0), ceiling) for layer in model.layers], width, label=name)
        for bar, layer in zip(bars, model.layers):
            if layer.output_sqnr == math.inf:
                bar.set_hatch("//")
        bottom.plot(x, [layer.weight_sqnr_per_channel for layer in model.layers], ".-", label=f"{name}, per-channel")
        bottom.plot(x, [layer.weight_sqnr_per_tensor for layer in model.layers], "x:", label=f"{name}, per-tensor")
    top.set_ylabel("conv output SQNR (dB)\nint8 vs fp32 (hatched: inf)")
    top.set_title(f"Per-layer int8 quantization error ({models[0].settings.describe()})", fontsize=9)
    bottom.set_ylabel("weight SQNR (dB)\nint8 weights alone")
    bottom.set_xlabel("deployed conv (index in model.onnx)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
