"""int8 from a ppfuse export: ``model_int8.onnx`` (QDQ) next to its ``model.onnx``, calibrated on images.

    from ppfuse.deploy import quantize
    result = quantize.quantize_export("output_inference/ppyoloe_plus_crn_s_320_test", "dataset/shapes/train")
    # -> model_int8.onnx next to model.onnx; tools/infer.py --runtime onnxruntime|openvino --precision int8 runs it

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

What int8 costs each conv (SQNR) is measured by :mod:`ppfuse.measure.sqnr`.
Needs the ``[int8]`` extra (ONNX Runtime's quantization imports
``ml_dtypes``; 0.3.2 keeps numpy 1.23).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ppfuse.errors import ConfigError, ExportError, require_module
from ppfuse.export_format import (INT8_ONNX_FILE, INT8_OPENVINO_FILE, ONNX_FILE, REPORT_FILE, nms_after_graph,
                                  read_report)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")  # ONNX Runtime's MinMax, Entropy, Percentile
OPENVINO_INT8 = ("nncf", "qdq")  # OpenVINO's int8: NNCF's model_int8.xml, or model_int8.onnx (ONNX Runtime's QDQ)
OPENVINO_INT8_HELP = ("OpenVINO's int8 model: nncf (default: OpenVINO's own quantizer writes model_int8.xml) or qdq "
                      "(OpenVINO runs model_int8.onnx, ONNX Runtime's QDQ file)")
ACTIVATION_TYPES = ("uint8", "int8")
INPUTS = ("image", "im_shape", "scale_factor")  # what an export may take; each model takes its own
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
    openvino: str = "nncf"  # OPENVINO_INT8

    def check(self) -> None:
        if self.openvino not in OPENVINO_INT8:
            raise ConfigError(f"--openvino_int8 {self.openvino}: use nncf or qdq")
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
                        "around 0 (zero point 0 for int8); with NNCF its PERFORMANCE preset")
    parser.add_argument("--openvino_int8", default="nncf", help=OPENVINO_INT8_HELP)


def settings_from_args(args) -> QuantizeSettings:
    """:class:`QuantizeSettings` from the arguments of :func:`add_arguments`, checked."""
    settings = QuantizeSettings(images=args.images, calibration=args.calibration, per_channel=not args.per_tensor,
                                activation_type=args.activation_type,
                                symmetric_activations=args.symmetric_activations, openvino=args.openvino_int8)
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
    openvino_path: Optional[str] = None  # NNCF's model_int8.xml, when written
    openvino_quantized_convs: int = 0

    def line(self) -> str:
        text = (f"wrote {self.path}: {self.quantized_convs} of {self.convs} convs int8 "
                f"({self.settings.describe()})")
        if self.openvino_path:
            text += (f"; for OpenVINO {self.openvino_path}: {self.openvino_quantized_convs} of {self.convs} convs "
                     "int8 (NNCF, same images)")
        return text


def model_feeds(model, feeds: Sequence[Mapping[str, np.ndarray]]) -> List[Dict[str, np.ndarray]]:
    """``feeds`` restricted to the inputs the ONNX ``model`` takes (an export takes some of :data:`INPUTS`)."""
    names = {i.name for i in model.graph.input}
    return [{k: v for k, v in feed.items() if k in names} for feed in feeds]


def require_quantization():
    """ONNX Runtime's quantization package, or one line saying which extra installs what it needs (ml_dtypes
    and onnx, which it imports, are asked for first so that the line names them)."""
    require_module("ml_dtypes", "int8", "int8")
    require_module("onnx", "int8", "int8")
    return require_module("onnxruntime.quantization", "int8", "int8")


# --- calibration data -------------------------------------------------------------------------------------------


def calibration_images(image_dir: str, count: int) -> List[str]:
    """The first ``count`` images of ``image_dir`` in name order (the same ones on every run)."""
    from ppfuse.deploy.inference import list_images
    if not os.path.isdir(image_dir):
        raise ConfigError(f"--image_dir {image_dir}: not a directory (e.g. dataset/shapes/train, written by "
                          "tools/make_shapes_dataset.py)")
    return list_images(image_dir)[:count]


def calibration_inputs(model_dir: str, paths: Sequence[str]) -> List[Dict[str, np.ndarray]]:
    """The network's inputs for each image, preprocessed as the export's ``infer_cfg.yml`` says."""
    from ppfuse.deploy.inference import Preprocess, read_image
    preprocess = Preprocess.from_infer_cfg(model_dir)
    return [{k: v for k, v in preprocess(read_image(p)).items() if k in INPUTS} for p in paths]


# --- the ONNX model ---------------------------------------------------------------------------------------------


def constants_as_initializers(model):
    """``model`` with every ``Constant`` node's tensor moved into the graph's initializers (in place).

    paddle2onnx writes the conv weights as Constant nodes. ONNX Runtime's
    quantizer treats those as activations: the file keeps float weights behind
    a QuantizeLinear, and OpenVINO then runs the convs in f32. As initializers
    they are stored as int8 and run int8.
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
    model = onnx.load(source)
    feeds = model_feeds(model, feeds)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        onnx.save(constants_as_initializers(model), prepared)
        quantization.quantize_static(
            prepared, target, Reader(), quant_format=quantization.QuantFormat.QDQ, op_types_to_quantize=list(
                settings.op_types), per_channel=settings.per_channel, activation_type=activation,
            weight_type=quantization.QuantType.QInt8, calibrate_method=method, nodes_to_exclude=list(settings.exclude),
            calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": bool(settings.symmetric_activations)})
    quantized = onnx.load(target)
    if swish_as_quick_gelu(quantized):
        onnx.save(quantized, target)


def require_nncf():
    """NNCF (OpenVINO's quantizer) and OpenVINO, or one line naming the extra that installs them."""
    require_module("openvino", "int8 for OpenVINO", "int8")
    return require_module("nncf", "int8 for OpenVINO", "int8")


def quantize_openvino(source: str, target: str, feeds: Sequence[Mapping[str, np.ndarray]],
                      settings: Optional[QuantizeSettings] = None, float_after_convolutions: bool = False) -> int:
    """Write OpenVINO's int8 model (IR: ``target`` .xml and its .bin) of the float ONNX model ``source``,
    quantized by NNCF calibrated on ``feeds``; returns how many convolutions it quantized.

    NNCF places the FakeQuantize nodes where OpenVINO's CPU plugin runs them in int8 (conv inputs, and the
    inputs of concats and adds between quantized convs, so that tensors stay int8 between convs), keeps
    each conv's swish in its conv, and corrects each conv's bias for the mean shift int8 weights cause
    (fast bias correction). Weights: int8, symmetric, per output channel. Activations: asymmetric (zero
    point, ``MIXED`` preset) by default, symmetric with ``settings.symmetric_activations``; their ranges are
    the calibration images' minimum and maximum, as ONNX Runtime's MinMax takes them (NNCF's default
    averages each image's extremes, which clipped a random-weight PP-YOLOE's heavy tails; docs/qarepvgg-int8.md).

    ``float_after_convolutions``: NNCF leaves every node float from which no convolution follows (box decoding,
    scores), as ONNX Runtime's QDQ model does (convs only). For an export whose NMS follows the graph (rotated
    boxes): NNCF quantizes the corner arithmetic to 8 bits otherwise, and a rotated rectangle's four corners
    no longer make one (seen: PP-YOLOE-R's corners crossing), which polygon NMS cannot take.
    """
    settings = settings or QuantizeSettings()
    settings.check()
    nncf = require_nncf()
    import openvino as ov
    from ppfuse.runtime.openvino_runtime import read_file
    model = read_file(ov, None, source)
    names = {i.get_any_name() for i in model.inputs}
    data = [{k: v for k, v in feed.items() if k in names} for feed in feeds]
    preset = nncf.QuantizationPreset.PERFORMANCE if settings.symmetric_activations else nncf.QuantizationPreset.MIXED
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    logging.getLogger("nncf").setLevel(logging.ERROR)
    ignored = list(settings.exclude) + (nodes_after_convolutions(model) if float_after_convolutions else [])
    quantized = nncf.quantize(model, nncf.Dataset(data), preset=preset, subset_size=len(data),
                              fast_bias_correction=True, advanced_parameters=AdvancedQuantizationParameters(
                                  activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
                              ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None)
    ov.save_model(quantized, target, compress_to_fp16=False)
    return openvino_int8_convolutions(quantized)


OPENVINO_CONVOLUTIONS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData")


def nodes_after_convolutions(model) -> List[str]:
    """The names of an OpenVINO model's computing nodes from which no convolution follows (its post-processing
    after the last convolutions; not parameters, constants or results)."""
    feeds_convolution = set()
    for op in reversed(model.get_ordered_ops()):  # users before producers
        users = [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]
        if any(u.get_type_name() in OPENVINO_CONVOLUTIONS or u.get_friendly_name() in feeds_convolution
               for u in users):
            feeds_convolution.add(op.get_friendly_name())
    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_friendly_name() not in feeds_convolution and op.get_type_name() not in
            OPENVINO_CONVOLUTIONS + ("Parameter", "Constant", "Result")]


def quantize_openvino_or_say_why(source: str, target: str, feeds: Sequence[Mapping[str, np.ndarray]],
                                 settings: Optional[QuantizeSettings] = None, log: Log = print,
                                 float_after_convolutions: bool = False):
    """:func:`quantize_openvino`, or, for a model OpenVINO cannot read or run (an operator it has no rule for), no file
    and one logged line: ``(int8 convolutions, None)`` or ``(0, why)``."""
    try:
        return quantize_openvino(source, target, feeds, settings, float_after_convolutions), None
    except Exception as exc:  # ONNX Runtime's file is written all the same
        from ppfuse.runtime.openvino_runtime import conversion_failure
        why = conversion_failure(exc)
        log(f"no {INT8_OPENVINO_FILE}: OpenVINO cannot read or run {ONNX_FILE} ({why}); {INT8_ONNX_FILE} is "
            "written for ONNX Runtime")
        for path in (target, _bin(target)):
            if os.path.exists(path):
                os.remove(path)
        return 0, why


def openvino_int8_convolutions(model) -> int:
    """Convolutions the CPU plugin runs in int8 (u8/i8) when it compiles ``model`` -- counted from the compiled
    model, as the runtime reports it: a FakeQuantize may sit before a concat or pooling that feeds the conv."""
    import openvino as ov
    from ppfuse.runtime.openvino_runtime import INT8_TYPES, runtime_convolutions
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return sum(n for kind, n in runtime_convolutions(compiled).items() if kind in INT8_TYPES)


def swish_as_quick_gelu(model) -> int:
    """Every swish ``Mul(x, Sigmoid(x))`` of ``model`` as one ``com.microsoft.QuickGelu(x, alpha=1)`` -- the
    same function, ``x * sigmoid(1 * x)`` -- in place; returns how many.

    ONNX Runtime fuses a float swish into ``QuickGelu`` itself, but not where ``x`` comes from a
    DequantizeLinear, which is every swish of a QDQ model whose convs carry their own bias (ppfuse's: the
    BatchNorm that sat between conv and swish is folded). Its int8 run then spent more time in separate
    ``Sigmoid`` and ``Mul`` nodes than the ppdet path's int8 model, BatchNorms included
    (ONNX Runtime's profiler, PP-YOLOE+ s at 640). OpenVINO reads the contrib op as well."""
    from onnx import helper
    users: Dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    replaced = {}
    for node in model.graph.node:
        if node.op_type != "Sigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        after = users.get(node.output[0], [])
        if (len(after) == 1 and after[0].op_type == "Mul" and after[0].domain in ("", "ai.onnx")
                and sorted(after[0].input) == sorted([node.input[0], node.output[0]])):
            mul = after[0]
            replaced[id(node)] = None
            replaced[id(mul)] = helper.make_node("QuickGelu", [node.input[0]], [mul.output[0]], name=mul.name + "_swish",
                                                 domain="com.microsoft", alpha=1.0)
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n is not None)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(1 for v in replaced.values() if v is not None)


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
    """Write ``model_int8.onnx`` next to the export's ``model.onnx`` and, for OpenVINO, NNCF's
    ``model_int8.xml`` (``settings.openvino == "nncf"``); record them in ``ppfuse_report.json``.

    Each runtime runs the file its own vendor's quantizer wrote, from the same calibration images: ONNX
    Runtime ``model_int8.onnx``, OpenVINO ``model_int8.xml`` (with ``openvino="qdq"`` none is written, a
    stale one is removed, and OpenVINO runs ``model_int8.onnx``).

    Args:
        model_dir: an export directory written with ``--onnx``.
        image_dir: calibration images (e.g. ``dataset/shapes/train``); the first ``settings.images`` by name.
        settings: :class:`QuantizeSettings` (default: MinMax, per-channel int8 weights, uint8 activations,
            Conv only, 32 images; NNCF for OpenVINO).

    Raises:
        ConfigError: a missing ``model.onnx``, extra, image directory, or bad settings.
        ExportError: a file could not be written (nothing is left half-written: files are staged and
            moved into place together at the end).
    """
    settings = settings or QuantizeSettings()
    settings.check()
    source = os.path.join(model_dir, ONNX_FILE)
    if not os.path.isfile(source):
        raise ConfigError(f"{model_dir}: no {ONNX_FILE}; export with --onnx (tools/export_deploy.py ... --onnx) "
                          "before quantizing")
    require_quantization()
    if settings.openvino == "nncf":
        require_nncf()
    import onnx
    paths = calibration_images(image_dir, settings.images)
    log(f"calibrating on {len(paths)} image(s) of {image_dir} ({settings.describe()})")
    feeds = calibration_inputs(model_dir, paths)
    float_tail = nms_after_graph(model_dir) is not None
    target = os.path.join(model_dir, INT8_ONNX_FILE)
    xml = os.path.join(model_dir, INT8_OPENVINO_FILE)
    report_path = os.path.join(model_dir, REPORT_FILE)
    staged = {target: target + ".tmp", report_path: report_path + ".tmp"}
    if settings.openvino == "nncf":
        staged[xml] = os.path.join(model_dir, ".staging_" + INT8_OPENVINO_FILE)
        staged[_bin(xml)] = _bin(staged[xml])
    try:
        quantize_onnx(source, staged[target], feeds, settings)
        quantized = onnx.load(staged[target])
        result = QuantizeResult(target, len(conv_nodes(quantized)), quantized_conv_count(quantized), paths, settings)
        openvino_failure = None
        if settings.openvino == "nncf":
            log("quantizing for OpenVINO with NNCF")
            # NMS after the graph (rotated boxes) needs the corners as the network computes them
            convs, openvino_failure = quantize_openvino_or_say_why(source, staged[xml], feeds, settings, log,
                                                                   float_after_convolutions=float_tail)
            if openvino_failure is None:
                result.openvino_quantized_convs, result.openvino_path = convs, xml
            else:
                del staged[xml], staged[_bin(xml)]
        report = read_report(model_dir)
        record = asdict(settings)
        record.update(file=INT8_ONNX_FILE, images=len(paths), image_dir=image_dir, convs=result.convs,
                      quantized_convs=result.quantized_convs, op_types=list(settings.op_types),
                      exclude=list(settings.exclude),
                      openvino_file=(INT8_OPENVINO_FILE if result.openvino_path else
                                     None if openvino_failure else INT8_ONNX_FILE),
                      openvino_quantized_convs=result.openvino_quantized_convs if result.openvino_path else None,
                      openvino_failure=openvino_failure,
                      openvino_float_after_convolutions=bool(result.openvino_path) and float_tail)
        report["int8"] = record
        with open(staged[report_path], "w") as f:
            json.dump(report, f, indent=1)
        if settings.openvino == "qdq":  # a model_int8.xml of an earlier run would be run by OpenVINO instead
            for path in (xml, _bin(xml)):
                if os.path.exists(path):
                    os.remove(path)
        for final, staging in staged.items():
            os.replace(staging, final)
    except OSError as exc:
        raise ExportError(f"{model_dir}: cannot write the int8 files ({exc.strerror})") from None
    finally:
        for staging in staged.values():
            if os.path.exists(staging):
                os.remove(staging)
    return result


def _bin(xml: str) -> str:
    """The weights file of an OpenVINO IR ``.xml``."""
    return xml[:-len(".xml")] + ".bin"
