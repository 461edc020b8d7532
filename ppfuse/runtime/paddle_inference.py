"""Paddle Inference: predictor settings, bf16 through oneDNN, and the precision oneDNN really ran.

Default settings on CPU are the fastest measured to give the same detections
on every run: oneDNN on with all of Paddle Inference's passes (oneDNN off is
far slower on PP-YOLOE; results/benchmark/ has the figures). :class:`~ppfuse.runtime.base.RuntimeOptions`
lets a user change each of them.

Not a default, though once measured as a lever: oneDNN with
``constant_folding_pass`` deleted. On Paddle 3.3.1 a predictor built so runs a
conv with bias followed by an activation right the first time and wrong on
every later run (NaN boxes and scores on PP-YOLOE, so no detections); its
apparent speed-up came from NMS having nothing left to do. Deleting that pass
with oneDNN on is allowed but warned about.

bf16 (``--precision bf16``, CPU): ``Config.enable_onednn_bfloat16()``, which
needs oneDNN. Which precision ran is read from oneDNN's own log of one run
(``dnnl_set_verbose``): the data type of every convolution it executed.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from typing import Dict, List, Mapping, Optional

import numpy as np
import paddle

from ppfuse.errors import InferenceError
from ppfuse.export_format import (PARAMS_FILE, PLAIN_PROGRAM_FILE, plain_program_file, program_file, read_report,
                             require_paddle_3)
from ppfuse.runtime.base import PrecisionReport, Runtime, RuntimeOptions, check_options

# passes that, deleted with oneDNN on, make Paddle 3.3.1 give wrong outputs after the first run
UNSAFE_TO_DELETE_WITH_ONEDNN = ("constant_folding_pass",)
# passes deleted for bf16: with bf16 placement, Paddle 3.3.1's fusion of a reshape into the transpose before it
# leaves the next op the transpose's shape (PicoDet's and GFL's distribution integral: transpose, reshape to
# [-1, 8], softmax, matmul -- "K_lhs:32 != K_rhs:8" when the predictor is created). Without it PicoDet runs
# in bf16; PP-YOLOE+ s at 640 measured the same with and without (2026-12-06, AMX Xeon, by hand)
DELETED_FOR_BF16 = ("operator_reshape_onednn_fuse_pass",)


def check_device(options: RuntimeOptions) -> None:
    """Raise one clear :class:`InferenceError` for a device/precision this build cannot run."""
    check_options(options, "paddle")
    if options.device == "gpu":
        if not paddle.is_compiled_with_cuda():
            raise InferenceError(f"--device gpu: this Paddle {paddle.__version__} build has no CUDA support; "
                                 "install a PaddlePaddle 3.x GPU build (docs/gpu.md), or use --device cpu")
        if paddle.device.cuda.device_count() == 0:
            raise InferenceError("--device gpu: Paddle has CUDA support but sees no GPU; use --device cpu")
    elif options.precision == "bf16" and not options.onednn:
        raise InferenceError("--precision bf16 runs through oneDNN; drop --onednn off (or use --precision fp32)")


def program_for(model_dir: str, options: RuntimeOptions) -> str:
    """The program file Paddle Inference runs: ``model_plain.json`` on CPU with oneDNN off where the export
    wrote one, else ``model.json``."""
    plain = plain_program_file(model_dir) if options.device == "cpu" and not options.onednn else None
    return plain or program_file(model_dir)


def create_predictor(model_dir: str, options: Optional[RuntimeOptions] = None, program: Optional[str] = None):
    """A Paddle Inference predictor for an exported directory: its ``model.json``, or on CPU with oneDNN
    off its ``model_plain.json`` where the export wrote one (``program`` chooses a file instead)."""
    options = options or RuntimeOptions()
    require_paddle_3(InferenceError)
    check_device(options)
    if options.precision == "fp16":
        overflow = read_report(model_dir).get("fp16_overflow") or {}
        if overflow:
            name = next(iter(overflow))
            print(f"WARNING: {len(overflow)} weights of {model_dir} exceed the float16 range (first {name}, "
                  f"|w| up to {max(overflow.values()):.3g}); fp16 results will contain Inf/NaN -- use fp32",
                  file=sys.stderr)
    program = program or program_for(model_dir, options)
    params = os.path.join(model_dir, PARAMS_FILE)
    if not os.path.exists(params):
        raise InferenceError(f"{model_dir}: {PARAMS_FILE} is missing; export the model again")
    config = paddle.inference.Config(program, params)
    if options.device == "gpu":
        config.enable_use_gpu(options.gpu_memory_mb, options.gpu_id)
        precision = (paddle.inference.PrecisionType.Half if options.precision == "fp16"
                     else paddle.inference.PrecisionType.Float32)
        if options.tensorrt:
            config.enable_tensorrt_engine(workspace_size=1 << 30, max_batch_size=1, min_subgraph_size=3,
                                          precision_mode=precision, use_static=False, use_calib_mode=False)
        elif options.precision == "fp16":
            config.enable_use_gpu(options.gpu_memory_mb, options.gpu_id, precision)
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(options.cpu_threads)
        if options.onednn:
            config.enable_onednn()
            if options.precision == "bf16":
                config.enable_onednn_bfloat16()
                for name in DELETED_FOR_BF16:
                    config.delete_pass(name)
        else:
            config.disable_onednn()
            if (os.path.basename(program) != PLAIN_PROGRAM_FILE
                    and (read_report(model_dir).get("rewrites") or {}).get("conv_bias") == "in_conv"):
                # an export from before model_plain.json: Paddle's plain kernels broadcast the [1, C, 1, 1]
                # bias adds slowly over a batch, which made it slower than the ppdet path there
                print(f"WARNING: {model_dir} keeps conv biases in the form oneDNN fuses and has no "
                      "model_plain.json; with oneDNN off, Paddle's own kernels add them slowly at batch > 1 -- "
                      "export it again (or with --conv_bias channel_add)", file=sys.stderr)
    for name in options.delete_passes:
        if options.device == "cpu" and options.onednn and name in UNSAFE_TO_DELETE_WITH_ONEDNN:
            print(f"WARNING: deleting {name} with oneDNN on: Paddle {paddle.__version__} then gives wrong "
                  "outputs (NaN) from the second run on for a conv with bias and an activation; "
                  "check repeated runs before relying on it", file=sys.stderr)
        config.delete_pass(name)
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def run_predictor(predictor, inputs: Mapping[str, np.ndarray]) -> List[np.ndarray]:
    """Feed inputs by name, run, return every output as an array."""
    for name in predictor.get_input_names():
        if name not in inputs:
            raise InferenceError(f"the model needs input '{name}', given {sorted(inputs)}")
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(inputs[name]))
    predictor.run()
    return [predictor.get_output_handle(n).copy_to_cpu() for n in predictor.get_output_names()]


# --- which precision oneDNN ran ---------------------------------------------------------------------------------


def _onednn_library():
    """Paddle's own oneDNN (``paddle/libs/libdnnl.so.3``, already loaded by Paddle), or None."""
    path = os.path.join(os.path.dirname(paddle.__file__), "libs", "libdnnl.so.3")
    try:
        library = ctypes.CDLL(path)
        library.dnnl_set_verbose
        return library
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _stdout_to(path: str):
    """File descriptor 1 (where oneDNN's verbose log goes, through C's printf) into ``path`` while inside."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "wb") as target:
        os.dup2(target.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def onednn_convolution_types(call) -> Optional[Dict[str, int]]:
    """Run ``call()`` once with oneDNN's verbose log on; count its convolutions by source data type
    (``{"bf16": 86}``). None when Paddle's oneDNN library cannot be reached."""
    library = _onednn_library()
    if library is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "onednn_verbose.txt")
        with _stdout_to(log):
            if library.dnnl_set_verbose(1) != 0:
                return None
            try:
                call()
            finally:
                library.dnnl_set_verbose(0)
        with open(log, errors="replace") as f:
            lines = [line for line in f if line.startswith("onednn_verbose") and ",exec,cpu,convolution," in line]
    counts: Dict[str, int] = {}
    for line in lines:
        source = next((t for field in line.split(",") for t in field.split() if t.startswith("src:")), "src:?")
        dtype = source.split(":")[1]
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts


class PaddleInference(Runtime):
    """An export's ``model.json`` in Paddle Inference (oneDNN on CPU by default; with oneDNN off, its
    ``model_plain.json`` where there is one, :func:`create_predictor`)."""

    name = "paddle"
    title = "Paddle Inference"

    def __init__(self, model_dir: str, options: Optional[RuntimeOptions] = None):
        super().__init__(model_dir, options or RuntimeOptions())
        self.predictor = create_predictor(model_dir, self.options)
        self.input_names = list(self.predictor.get_input_names())
        self._name_outputs(self.predictor.get_output_names())

    def _run(self, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
        return run_predictor(self.predictor, feeds)

    def settings(self) -> str:
        o = self.options
        if o.device == "gpu":
            return f"{self.title} GPU{' TensorRT' if o.tensorrt else ''} {o.precision}"
        passes = f", deleting {' + '.join(o.delete_passes)}" if o.delete_passes else ""
        return f"{self.title} {'oneDNN' if o.onednn else 'no oneDNN'}{passes} {o.precision}"

    def confirm_precision(self, inputs: Mapping[str, np.ndarray]) -> PrecisionReport:
        o = self.options
        if o.device == "gpu":
            return PrecisionReport(o.precision, o.precision, "as configured on the GPU; not read back")
        if not o.onednn:
            return PrecisionReport(o.precision, "fp32", "Paddle's own CPU kernels run fp32 only")
        counts = onednn_convolution_types(lambda: self.run(inputs))
        if not counts:
            return PrecisionReport(o.precision, o.precision, "oneDNN's verbose log could not be read; as configured")
        names = {"f32": "fp32", "bf16": "bf16"}
        kinds = {names.get(k, k) for k in counts}
        ran = kinds.pop() if len(kinds) == 1 else "mixed"
        total = sum(counts.values())
        detail = ", ".join(f"{n} of {total} convolutions {names.get(k, k)}" for k, n in sorted(counts.items()))
        return PrecisionReport(o.precision, ran, f"oneDNN executed {detail}")
