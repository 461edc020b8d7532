"""int8 from a ppfuse export, and how much int8 costs each deployed conv (SQNR).

    from ppfuse import quantize
    result = quantize.quantize_export("output_inference/ppyoloe_plus_crn_s_320_test", "dataset/shapes/train")
    # -> model_int8.onnx next to model.onnx; tools/infer.py --runtime onnxruntime|openvino --precision int8 runs it
    errors = quantize.layer_errors(fp32_onnx, int8_onnx, feeds)   # per conv: output and weight SQNR in dB

Quantization is ONNX Runtime's static post-training quantization
(``quantize_static``) in QDQ format: every Conv gets QuantizeLinear ->
DequantizeLinear pairs on its input and output activations (uint8 by default)
and int8 weights stored as such with a DequantizeLinear (per output channel by
default), calibrated on images preprocessed exactly as the export's
``infer_cfg.yml`` says. Only Conv nodes are quantized -- they hold nearly all
of the network's arithmetic; the rest of PP-YOLOE (swish's Sigmoid and Mul,
the residual Adds, the ESE attention, the head's Softmax, box decoding and NMS)
stays float, so residual sums and decoding are computed as in fp32. Quantizing
Add/Mul too would add QDQ pairs whose effect is not measured here.

uint8 activations (asymmetric) rather than int8: every conv input here is a
swish output or the normalized image, ranges far from symmetric (swish >=
-0.28), which symmetric int8 would spend half its codes on; and x86's VNNI
``vpdpbusd`` multiplies unsigned by signed 8-bit, the u8 x s8 form oneDNN and
OpenVINO use natively. ``activation_type="int8"`` is available for comparison.

The signal-to-quantization-noise ratio, in dB, of a tensor ``y`` against its
fp32 reference ``r``: ``10 * log10(sum(r**2) / sum((y - r)**2))`` -- infinite
when they are equal. :func:`layer_errors` measures it for every conv's output
(the int8 model's dequantized output against the fp32 model's, over all images:
the error accumulated up to that layer) and for its weights alone, quantized
per output channel and per tensor (one scale for the whole kernel, which a
re-parameterized kernel with an outlier channel pays for on every other
channel). Needs the ``[int8]`` extra (ONNX Runtime's quantization imports
``ml_dtypes``; 0.3.2 keeps numpy 1.23).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError, ExportError
from .export_format import INT8_ONNX_FILE, ONNX_FILE, REPORT_FILE, read_report

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's MinMax, Entropy, Percentile
ACTIVATION_TYPES = ("uint8", "int8")
INPUTS = ("image", "scale_factor")
Log = Callable[[str], None]


@dataclass
class QuantizeSettings:
    """How to quantize: calibration images, method, weight granularity, activation type, node types."""
    images: int = 32
    calibration: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    symmetric_activations: bool = False  # zero point 0 (int8) / 128 (uint8): no zero-point subtraction to run
    op_types: Sequence[str] = ("Conv",)
    exclude: Sequence[str] = ()  # node names to leave float

    def check(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise ConfigError(f"--calibration {self.calibration}: use one of {', '.join(CALIBRATION_METHODS)}")
        if self.activation_type not in ACTIVATION_TYPES:
            raise ConfigError(f"--activation_type {self.activation_type}: use uint8 or int8")
        if self.images < 1:
            raise ConfigError(f"--images {self.images}: calibrate on 1 image or more")

    def describe(self) -> str:
        return (f"QDQ, {'/'.join(self.op_types)} only, {'per-channel' if self.per_channel else 'per-tensor'} int8 "
                f"weights, {'symmetric ' if self.symmetric_activations else ''}{self.activation_type} activations, {self.calibration} calibration on "
                f"{self.images} image(s)" + (f", {len(self.exclude)} node(s) left float" if self.exclude else ""))


def add_arguments(parser, images: int = 32) -> None:
    """The calibration and quantization arguments of ``tools/quantize.py`` and ``tools/quantization_error.py``."""
    parser.add_argument("--image_dir", default="dataset/shapes/train", help="calibration images "
                        "(default dataset/shapes/train: tools/make_shapes_dataset.py)")
    parser.add_argument("--images", type=int, default=images, help=f"calibration images, the first by name "
                        f"(default {images})")
    parser.add_argument("--calibration", default="minmax", help="minmax (default), entropy or percentile")
    parser.add_argument("--per_tensor", action="store_true", help="one weight scale per kernel (default: per "
                        "output channel)")
    parser.add_argument("--activation_type", default="uint8", help="uint8 (default) or int8")
    parser.add_argument("--symmetric_activations", action="store_true", help="activation ranges symmetric "
                        "around 0 (zero point 0 for int8): OpenVINO then has no zero point to subtract")


def settings_from_args(args) -> QuantizeSettings:
    """:class:`QuantizeSettings` from the arguments of :func:`add_arguments`, checked."""
    settings = QuantizeSettings(images=args.images, calibration=args.calibration, per_channel=not args.per_tensor,
                                activation_type=args.activation_type,
                                symmetric_activations=args.symmetric_activations)
    settings.check()
    return settings


@dataclass
class QuantizeResult:
    """What :func:`quantize_export` wrote: the file, how many of the convs it quantized, on which images."""
    path: str
    convs: int
    quantized_convs: int
    images: List[str]
    settings: QuantizeSettings

    def line(self) -> str:
        return (f"wrote {self.path}: {self.quantized_convs} of {self.convs} convs int8 "
                f"({self.settings.describe()})")


def require_quantization():
    """ONNX Runtime's quantization package, or one line saying which extra installs what it needs."""
    try:
        import ml_dtypes  # noqa: F401  (onnxruntime.quantization imports it; say so before it does)
        import onnx  # noqa: F401
        from onnxruntime import quantization
    except ImportError as exc:
        raise ConfigError(f"int8 needs the optional package '{exc.name}': "
                          "pip install -c constraints.txt -e \".[int8]\"") from None
    return quantization


# --- calibration data -------------------------------------------------------------------------------------------


def calibration_images(image_dir: str, count: int) -> List[str]:
    """The first ``count`` images of ``image_dir`` in name order (the same ones on every run)."""
    from .inference import list_images
    if not os.path.isdir(image_dir):
        raise ConfigError(f"--image_dir {image_dir}: not a directory (e.g. dataset/shapes/train, written by "
                          "tools/make_shapes_dataset.py)")
    return list_images(image_dir)[:count]


def calibration_inputs(model_dir: str, paths: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """The network's inputs for each image, preprocessed as the export's ``infer_cfg.yml`` says."""
    from .inference import Preprocess, read_image
    preprocess = Preprocess.from_infer_cfg(model_dir)
    return [{k: v for k, v in preprocess(read_image(p)).items() if k in INPUTS} for p in paths]


# --- the ONNX model ---------------------------------------------------------------------------------------------


def constants_as_initializers(model):
    """``model`` with every ``Constant`` node's tensor moved into the graph's initializers (in place).

    paddle2onnx writes the conv weights as Constant nodes. ONNX Runtime's
    quantizer treats those as activations: the file keeps float weights behind
    a QuantizeLinear, and OpenVINO then runs all 86 convs of PP-YOLOE+ s in f32
    (measured, 2026.4.1). As initializers they are stored as int8 and run int8.
    """
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = model.graph.initializer.add()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def _quiet_onnxruntime() -> None:
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)  # the quantizer's session warns about each unused initializer
    logging.getLogger("root").setLevel(logging.ERROR)  # "Please consider to run pre-processing" on every call


def quantize_onnx(source: str, target: str, feeds: Sequence[Mapping[str, np.ndarray]],
                  settings: Optional[QuantizeSettings] = None) -> None:
    """Write the QDQ int8 model of the float ONNX model ``source`` to ``target``, calibrated on ``feeds``."""
    settings = settings or QuantizeSettings()
    settings.check()
    quantization = require_quantization()
    import onnx
    _quiet_onnxruntime()

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    method = {"minmax": quantization.CalibrationMethod.MinMax, "entropy": quantization.CalibrationMethod.Entropy,
              "percentile": quantization.CalibrationMethod.Percentile}[settings.calibration]
    activation = quantization.QuantType.QUInt8 if settings.activation_type == "uint8" else quantization.QuantType.QInt8
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        onnx.save(constants_as_initializers(onnx.load(source)), prepared)
        quantization.quantize_static(
            prepared, target, Reader(), quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=list(
                settings.op_types), per_channel=settings.per_channel, activation_type=activation,
            weight_type=quantization.QuantType.QInt8, calibrate_method=method, nodes_to_exclude=list(settings.exclude),
            calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": bool(settings.symmetric_activations)})


def conv_nodes(model) -> list:
    return [node for node in model.graph.node if node.op_type == "Conv"]


def quantized_conv_count(model) -> int:
    """Convs whose weight comes from a DequantizeLinear of an int8 initializer (what int8 runtimes fuse)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    initializers = {t.name for t in model.graph.initializer}
    count = 0
    for node in conv_nodes(model):
        weight = producers.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear" and weight.input[0] in initializers:
            count += 1
    return count


def quantize_export(model_dir: str, image_dir: str, settings: Optional[QuantizeSettings] = None,
                    log: Log = print) -> QuantizeResult:
    """Write ``model_int8.onnx`` next to the export's ``model.onnx`` and record it in ``ppfuse_report.json``.

    Args:
        model_dir: an export directory written with ``--onnx``.
        image_dir: calibration images (e.g. ``dataset/shapes/train``); the first ``settings.images`` by name.
        settings: :class:`QuantizeSettings` (default: MinMax, per-channel int8 weights, uint8 activations,
            Conv only, 32 images).

    Raises:
        ConfigError: a missing ``model.onnx``, extra, image directory, or bad settings.
        ExportError: the file could not be written.
    """
    settings = settings or QuantizeSettings()
    settings.check()
    source = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(source):
        raise ConfigError(f"{model_dir}: no {ONNX_FILE}; export with --onnx (tools/export_deploy.py ... --onnx) "
                          "before quantizing")
    require_quantization()
    import onnx
    paths = calibration_images(image_dir, settings.images)
    log(f"calibrating on {len(paths)} image(s) of {image_dir} ({settings.describe()})")
    feeds = calibration_inputs(model_dir, paths)
    target = os.path.join(model_dir, INT8_ONNX_FILE)
    staging = target + ".tmp"
    try:
        quantize_onnx(source, staging, feeds, settings)
        quantized = onnx.load(staging)
        result = QuantizeResult(target, len(conv_nodes(quantized)), quantized_conv_count(quantized), paths, settings)
        report = read_report(model_dir)
        record = asdict(settings)
        record.update(file=INT8_ONNX_FILE, images=len(paths), image_dir=image_dir, convs=result.convs,
                      quantized_convs=result.quantized_convs, op_types=list(settings.op_types),
                      exclude=list(settings.exclude))
        report["int8"] = record
        with open(os.path.join(model_dir, REPORT_FILE + ".tmp"), "w") as f:
            json.dump(report, f, indent=1)
        os.replace(staging, target)
        os.replace(os.path.join(model_dir, REPORT_FILE + ".tmp"), os.path.join(model_dir, REPORT_FILE))
    except OSError as exc:
        raise ExportError(f"{target}: cannot write ({exc.strerror})") from None
    finally:
        for path in (staging, os.path.join(model_dir, REPORT_FILE + ".tmp")):
            if os.path.exists(path):
                os.remove(path)
    return result


# --- SQNR -------------------------------------------------------------------------------------------------------


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
    lines = ["| model | convs | SQNR (dB) of | median | worst | worst layer |",
             "| --- | ---: | --- | ---: | ---: | --- |"]
    for name, model in zip(names, models):
        for key, title in COLUMNS:
            s = model.summary(key)
            worst = model.layers[s["worst_layer"]]
            lines.append(f"| {name} | {len(model.layers)} | {title} | {_db_text(s['median'])} | "
                         f"{_db_text(s['worst'])} | {worst.index} `{worst.name}` {worst.kernel} |")
    return "\n".join(lines)


def layer_table(models: Sequence[ModelErrors], names: Sequence[str]) -> str:
    """Markdown: one row per conv (by index; the exports share their layout), SQNR columns per model."""
    head = ["conv", "kernel"] + [f"{name}: {title}" for name in names for _, title in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |"]
    for i in range(max(len(m.layers) for m in models)):
        first = next(m.layers[i] for m in models if i < len(m.layers))
        cells = [str(i), "x".join(str(k) for k in first.kernel)]
        for model in models:
            layer = model.layers[i] if i < len(model.layers) else None
            cells += [_db_text(getattr(layer, key)) if layer else "" for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
