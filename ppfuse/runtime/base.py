"""The interface every runtime gives: load an export, run a batch, say which precision really ran.

As ONNX Runtime's ``InferenceSession.run(outputs, feeds)`` and OpenVINO's
``compiled_model(inputs)`` do for their users: named arrays in, named arrays
out. Precision is an explicit choice (:class:`RuntimeOptions`) that each
runtime confirms from what it executed (:meth:`Runtime.confirm_precision`),
never a silent default.

Also here: the CPU's bf16 support, read from ``/proc/cpuinfo`` (bf16 runs fast
only with ``avx512_bf16`` or AMX; without them oneDNN emulates it slowly and
OpenVINO silently runs f32, so ppfuse refuses bf16 there in one line).

An ONNX graph that ends before NMS (PP-YOLOE-R's rotated boxes, whose NMS has no ONNX form) is followed by
ppfuse's NMS (:mod:`ppfuse.runtime.rotated_nms`) in :meth:`Runtime.run`, so every runtime gives the export's
``bbox``, ``bbox_num``.

int8 (``--precision int8``, CPU) runs ``model_int8.onnx`` (``tools/quantize.py``) in ONNX Runtime or
OpenVINO; Paddle Inference's int8 is not supported by ppfuse. Each counts the convolutions that really
ran int8, and names the CPU's int8 instructions (:data:`INT8_FLAGS`).
"""
from __future__ import annotations

import abc
import platform
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from ppfuse.errors import InferenceError
from ppfuse.export_format import NMS_OUTPUTS, RAW_OUTPUTS, nms_after_graph, output_names
from ppfuse.runtime.rotated_nms import MultiClassNMS

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either runs bf16 natively; amx_tile is AMX's tile unit
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # VNNI's u8 x s8 dot products; AMX's int8 tiles
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass
class RuntimeOptions:
    """How to run: ``device`` cpu|gpu, ``precision`` fp32|bf16 (CPU)|int8 (CPU)|fp16 (GPU), CPU threads; Paddle
    Inference's own settings (oneDNN, deleted passes, TensorRT, GPU memory) are ignored by the others."""
    device: str = "cpu"
    precision: str = "fp32"
    tensorrt: bool = False
    cpu_threads: int = 2
    onednn: bool = True
    delete_passes: Sequence[str] = ()
    gpu_memory_mb: int = 500
    gpu_id: int = 0
    int8_model: str = ""  # OpenVINO int8: this file of the export (default: model_int8.xml if written, else .onnx)
    int8_rest: str = "fp32"  # OpenVINO int8: the precision of what is not quantized (fp32, or bf16 on a bf16 CPU)


@dataclass
class PrecisionReport:
    """What a runtime executed: ``ran`` is fp32, bf16, fp16, int8 or mixed; ``detail`` says how we know (for int8:
    how many of the convolutions ran int8)."""
    requested: str
    ran: str
    detail: str

    def line(self) -> str:
        return f"precision: {self.requested} requested, {self.ran} ran ({self.detail})"


# --- the CPU ----------------------------------------------------------------------------------------------------


def read_cpuinfo() -> str:
    """The text of ``/proc/cpuinfo`` ('' where there is none); the tests replace this function."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _first_field(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.split(":")[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> set:
    """The CPU's feature flags (``avx512_bf16``, ``amx_tile`` ...), from its first processor entry."""
    return set(_first_field(read_cpuinfo(), "flags").split())


def cpu_model() -> str:
    return _first_field(read_cpuinfo(), "model name") or platform.processor() or "unknown CPU"


def cpu_description() -> str:
    """One line: the CPU model and which of :data:`ISA_FLAGS` it has, e.g. for a benchmark's header."""
    flags = cpu_flags()
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ISA_FLAGS)
    return f"{cpu_model()} ({isa})"


def int8_isa() -> str:
    """The CPU's int8 instructions, e.g. ``avx512_vnni yes, avx_vnni no, amx_int8 no``."""
    flags = cpu_flags()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in INT8_FLAGS)


def bf16_supported() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def require_bf16() -> None:
    """Raise one clear line on a CPU without bf16 instructions."""
    if not bf16_supported():
        raise InferenceError(f"--precision bf16: this CPU ({cpu_model()}) has no bf16 instructions "
                             f"({' or '.join(BF16_FLAGS)} in /proc/cpuinfo), where bf16 is slower than fp32 or "
                             "silently runs as fp32; use --precision fp32")


def check_options(options: RuntimeOptions, runtime: str) -> None:
    """The checks every runtime shares: a known device and precision, fp16 on GPU, bf16 on a bf16 CPU."""
    if options.device not in ("cpu", "gpu"):
        raise InferenceError(f"--device {options.device}: use cpu or gpu")
    if options.precision not in PRECISIONS:
        raise InferenceError(f"--precision {options.precision}: use fp32, bf16 (CPU), int8 (CPU) or fp16 (GPU)")
    if options.precision == "int8" and runtime == "paddle":
        raise InferenceError("--precision int8: use fp32, bf16 (CPU) or fp16 (GPU) with --runtime paddle (ppfuse does "
                             "not run Paddle Inference int8); int8 runs model_int8.onnx (tools/quantize.py) in "
                             "--runtime onnxruntime or openvino")
    if options.device == "gpu" and options.precision == "int8":
        raise InferenceError("--precision int8 runs on CPU only here; use --device cpu")
    if options.device == "cpu" and options.precision == "fp16":
        raise InferenceError("--precision fp16 runs on GPU only; use --device gpu, or fp32 or bf16 on CPU")
    if options.device == "gpu" and options.precision == "bf16":
        raise InferenceError("--precision bf16 runs on CPU only here; use fp16 on GPU")
    if options.device == "cpu" and options.tensorrt:
        raise InferenceError("--tensorrt needs --device gpu")
    if options.cpu_threads < 1:
        raise InferenceError(f"--cpu_threads {options.cpu_threads}: use 1 or more")
    if options.device == "cpu" and options.precision == "bf16":
        require_bf16()
    if options.int8_rest not in ("fp32", "bf16"):
        raise InferenceError(f"--int8_rest {options.int8_rest}: use fp32 or bf16")
    if options.int8_rest == "bf16":
        if options.precision != "int8" or runtime != "openvino":
            raise InferenceError("--int8_rest bf16 sets what OpenVINO runs outside the int8 convolutions; use it with "
                                 "--runtime openvino --precision int8")
        require_bf16()


# --- the interface ----------------------------------------------------------------------------------------------


class Runtime(abc.ABC):
    """An export loaded into one runtime.

    Subclasses set ``input_names`` and ``output_names`` (ppfuse's names where
    the export's report gives them) and implement :meth:`_run` and
    :meth:`confirm_precision`.
    """

    name = "runtime"  # what --runtime calls it
    title = "Runtime"  # how tables name it

    def __init__(self, model_dir: str, options: RuntimeOptions):
        self.model_dir = model_dir
        self.options = options
        self.input_names: List[str] = []
        self.output_names: List[str] = []
        self.graph_output_names: List[str] = []  # what the graph gives: output_names unless NMS follows it
        self.nms_after: Optional[MultiClassNMS] = None  # ppfuse's NMS on the graph's outputs, if the export asks
        # an ONNX graph with NMS (paddle2onnx's) takes one image per run: a batch is run image by image
        self.one_image_per_run = False

    def _name_outputs(self, own_names: Sequence[str], onnx: bool = False) -> None:
        """Name the outputs; ``onnx``: a runtime of ``model.onnx``, which for an export whose NMS has no ONNX
        form (:func:`ppfuse.export_format.nms_after_graph`) gives the boxes and scores, to which this runtime
        applies ppfuse's NMS (:mod:`ppfuse.runtime.rotated_nms`): its outputs are Paddle Inference's."""
        record = nms_after_graph(self.model_dir) if onnx else None
        if record is None:
            self.output_names = self.graph_output_names = output_names(self.model_dir, own_names)
            return
        if len(own_names) != len(RAW_OUTPUTS):
            raise InferenceError(f"{self.model_dir}: the report asks for NMS after the ONNX graph, which should give "
                                 f"{' and '.join(RAW_OUTPUTS)}, but it gives {len(own_names)} outputs; export again")
        self.nms_after = MultiClassNMS.from_report(record, f"{self.model_dir}: the report")
        self.graph_output_names, self.output_names = list(RAW_OUTPUTS), list(NMS_OUTPUTS)

    def run(self, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run one batch: every input by name (extra names are ignored), every output by name, in order."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise InferenceError(f"the model needs input '{missing[0]}', given {sorted(inputs)}")
        feeds = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        batch = len(feeds[self.input_names[0]]) if self.input_names else 1
        if not self.one_image_per_run or batch <= 1:
            outputs = dict(zip(self.graph_output_names, self._run(feeds)))
        else:
            # (bbox [K, 6], bbox_num [1]) per image, concatenated in order: the batch's (bbox, bbox_num)
            runs = [self._run({n: np.ascontiguousarray(v[i:i + 1]) for n, v in feeds.items()}) for i in range(batch)]
            outputs = {name: np.concatenate([run[k] for run in runs], axis=0)
                       for k, name in enumerate(self.graph_output_names)}
        if self.nms_after is None:
            return outputs
        return dict(zip(self.output_names, self.nms_after(*(outputs[n] for n in RAW_OUTPUTS))))

    @abc.abstractmethod
    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        """The outputs of one run, in the runtime's order."""

    @abc.abstractmethod
    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        """Which precision the runtime executes, read back from the runtime (may run ``inputs`` once)."""

    def settings(self) -> str:
        """The settings in one phrase, e.g. for a table row."""
        return f"{self.title}, {self.options.precision}, {self.options.cpu_threads} thread(s)"
