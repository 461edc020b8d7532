"""Side-by-side benchmark of export variants in Paddle Inference, in one process.

Variants of one random-weight model (BatchNorm statistics from generated
images, alpha != 1), each exported by :func:`ppfuse.export.save_inference_model`:

* ``train form`` -- no conversion at all;
* ``ppdet path`` -- ``convert_to_deploy()`` on each ppdet ``RepVggBlock``, as
  ppdet's trainer export does, nothing else;
* ``ppfuse deploy`` -- :func:`ppfuse.convert`: every block one conv, every
  Conv+BN folded. Its program is already the plain network (one conv with
  bias per block, no BatchNorm), so no separate "plain" variant is built.

Runtimes: CPU with oneDNN and Paddle Inference's default passes, CPU with
oneDNN and ppfuse's settings (``constant_folding_pass`` deleted), CPU without
oneDNN; GPU rows only on a CUDA build with a device. Latency rounds are
interleaved (A B C A B C ...) so machine drift hits every variant alike.
"""
from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import paddle

from . import inference, layers
from .convert import convert
from .detection import DetectionConfig, DetectorForInference, build_model, sample_inputs
from .export import count_ops, save_inference_model, verify_deployed
from .verify import compare_detections

VARIANTS = ("train form", "ppdet path", "ppfuse deploy")
COUNTED = ("conv2d", "batch_norm", "add", "if")


@dataclass
class Runtime:
    name: str
    options: inference.PredictorOptions


def cpu_runtimes(threads: int) -> List[Runtime]:
    return [
        Runtime("CPU oneDNN, default passes", inference.PredictorOptions(cpu_threads=threads, delete_passes=[])),
        Runtime("CPU oneDNN, ppfuse passes", inference.PredictorOptions(
            cpu_threads=threads, delete_passes=["constant_folding_pass"])),
        Runtime("CPU no oneDNN", inference.PredictorOptions(cpu_threads=threads, onednn=False, delete_passes=[])),
    ]


def gpu_runtimes() -> List[Runtime]:
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return []
    return [Runtime("GPU fp32", inference.PredictorOptions(device="gpu")),
            Runtime("GPU TensorRT fp16", inference.PredictorOptions(device="gpu", precision="fp16", tensorrt=True))]


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import paddle2onnx  # noqa: F401
        return True
    except ImportError:
        return False


ONNX_RUNTIME = "ONNX Runtime CPU"


@dataclass
class VariantResult:
    name: str
    directory: str
    ops: Dict[str, int]
    params_bytes: int
    prepare_seconds: float = 0.0
    verify_seconds: float = 0.0
    error: Optional[str] = None


@dataclass
class Measurement:
    variant: str
    runtime: str
    batch: int
    times: List[float] = field(default_factory=list)
    parity: str = ""
    error: Optional[str] = None

    @property
    def median(self) -> float:
        return float(np.median(self.times)) if self.times else float("nan")

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times, 90)) if self.times else float("nan")


def conv_flops(model, size: List[int]) -> float:
    """Multiply-adds x 2 of every conv for one image, from the output shapes of a forward pass."""
    total = [0.0]
    hooks = []

    def hook(layer, inputs, output):
        k = int(np.prod(layer.weight.shape[1:]))  # C_in/g * kh * kw
        total[0] += 2.0 * k * float(np.prod(output.shape[1:]))
    for sub in model.sublayers():
        if layers.is_conv(sub):
            hooks.append(sub.register_forward_post_hook(hook))
    image, scale = sample_inputs(size, 1, 0)
    with paddle.no_grad():
        DetectorForInference(model, with_nms=False)(image, scale)
    for h in hooks:
        h.remove()
    return total[0]


def peak_flops() -> (float, str):
    """Peak fp32 FLOP rate of one core, and how it was derived (a nominal figure, see the note)."""
    flags, mhz, vendor = "", 0.0, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = line
                elif line.startswith("cpu MHz") and not mhz:
                    mhz = float(line.split(":")[1])
                elif line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":")[1].strip()
    except OSError:
        pass
    try:  # the boost clock, where the VM shows it
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            mhz = max(mhz, int(f.read()) / 1000.0)
    except OSError:
        pass
    if "avx512f" in flags and vendor != "AuthenticAMD":
        per_cycle, unit = 64, "AVX-512, 2 FMA units"
    elif "fma" in flags:
        # AMD Zen 4 runs 512-bit ops on two 256-bit FMA pipes: 32 fp32 FLOP/cycle like AVX2
        per_cycle, unit = 32, "2x256-bit FMA"
    else:
        per_cycle, unit = 8, "SSE"
    return mhz * 1e6 * per_cycle, f"{mhz:.0f} MHz x {per_cycle} fp32 FLOP/cycle ({unit}) per core"


def export_variants(config: DetectionConfig, workdir: str, log: Callable = print):
    """Build the random-weight model once and export the three variants; returns their results."""
    size = config.input_size()
    built = build_model(config, deploy=False, seed=0)
    train = built.training_model
    results = {}
    for name in VARIANTS:
        directory = os.path.join(workdir, name.replace(" ", "_"))
        os.makedirs(directory, exist_ok=True)
        verify_seconds = 0.0
        model = train if name == "train form" else copy.deepcopy(train)
        start = time.perf_counter()  # conversion in place, copying excluded for both converters
        if name == "ppdet path":
            for layer in model.sublayers():
                if hasattr(layer, "convert_to_deploy"):
                    layer.convert_to_deploy()
        elif name == "ppfuse deploy":
            convert(model, inplace=True)
        prepare = time.perf_counter() - start
        if name == "ppfuse deploy":
            start = time.perf_counter()
            verify_deployed(train, model, size)
            verify_seconds = time.perf_counter() - start
        result = VariantResult(name, directory, {}, 0, prepare, verify_seconds)
        try:
            save_inference_model(model, os.path.join(directory, "model"), size, with_nms=True)
            result.ops = count_ops(directory)
            result.params_bytes = os.path.getsize(os.path.join(directory, "model.pdiparams"))
            if name == "ppfuse deploy" and onnx_available():
                from . import onnx_support
                staging = os.path.join(directory, "onnx_source")
                save_inference_model(model, os.path.join(staging, "model"), size, True, topk_before_nms=True)
                onnx_support.to_onnx(staging, os.path.join(directory, onnx_support.ONNX_FILE))
        except Exception as exc:  # a variant that cannot be exported is a result, not a crash
            result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        log(f"exported {name}: {result.error or 'ok'}")
        results[name] = result
    return built, results


def reference_detections(model, size: List[int], batch: int):
    image, scale = sample_inputs(size, batch, 7)
    with paddle.no_grad():
        bbox, num = DetectorForInference(model)(image, scale)
    return {"image": image.numpy(), "scale_factor": scale.numpy()}, bbox.numpy(), num.numpy()


def measure(variants: Dict[str, VariantResult], runtimes: List[Runtime], inputs_by_batch, references,
            runs: int, warmup: int, box_tolerance: float, progress=None) -> List[Measurement]:
    """Interleaved latency of every (variant, runtime) pair, per batch size."""
    results = []
    for batch, inputs in inputs_by_batch.items():
        cells = []
        for variant in variants.values():
            for runtime in runtimes:
                if runtime.name == ONNX_RUNTIME and variant.name != "ppfuse deploy":
                    continue
                cell = Measurement(variant.name, runtime.name, batch)
                if variant.error:
                    cell.error = "not exported"
                else:
                    try:
                        if runtime.name == ONNX_RUNTIME:
                            from . import onnx_support
                            sess = onnx_support.session(os.path.join(variant.directory, onnx_support.ONNX_FILE),
                                                        runtime.options.cpu_threads)
                            call = (lambda sess=sess: onnx_support.run_onnx(sess, inputs))
                        else:
                            predictor = inference.create_predictor(variant.directory, runtime.options)
                            call = (lambda predictor=predictor: inference.run(predictor, inputs))
                        ref_bbox, ref_num = references[batch]
                        cell.parity = compare_detections((ref_bbox, ref_num), call(), box_tolerance)[1]
                        cells.append((cell, call))
                    except Exception as exc:
                        cell.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:160]}"
                results.append(cell)
        for round_index in range(warmup + runs):
            for cell, call in cells:
                start = time.perf_counter()
                call()
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    cell.times.append(elapsed)
                if progress:
                    progress()
        del cells
    return results


_RSS_TAIL = "\nimport resource\nprint('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def child_peak_mb(code: str, cwd: str) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``code``."""
    proc = subprocess.run([sys.executable, "-c", code + _RSS_TAIL], capture_output=True, text=True, cwd=cwd)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_KB")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe failed: {tail[0]}")
    return int(lines[-1].split()[1]) / 1024.0


def export_memory(config_path: str, root: str, workdir: str) -> Dict[str, float]:
    """Peak memory of building the training form and running it once, and of a whole ppfuse export."""
    setup = (f"import sys; sys.path.insert(0, {root!r})\n"
             f"from ppfuse import detection, export\n"
             f"config = detection.load_config({config_path!r})\n")
    train = setup + ("built = detection.build_model(config, deploy=False)\n"
                     "image, scale = export.sample_inputs(config.input_size())\n"
                     "export.DetectorForInference(built.model)(image, scale)\n")
    full = setup + f"export.export(config, {os.path.join(workdir, 'memory_probe')!r}, log=lambda *a: None)\n"
    return {"training form (build + one forward)": child_peak_mb(train, root),
            "ppfuse export": child_peak_mb(full, root)}


def machine_description(threads: int) -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":")[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return (f"{model or platform.processor()}, {os.cpu_count()} cores, {threads} threads; Python "
            f"{platform.python_version()}, Paddle {paddle.__version__}")


@dataclass
class BenchmarkResult:
    config: DetectionConfig
    variants: Dict[str, VariantResult]
    measurements: List[Measurement]
    flops: float
    memory: Dict[str, float]
    threads: int

    def cell(self, variant: str, runtime: str, batch: int) -> Optional[Measurement]:
        return next((m for m in self.measurements
                     if m.variant == variant and m.runtime == runtime and m.batch == batch), None)


def run_benchmark(config: DetectionConfig, workdir: str, threads: int = 2, runs: int = 30, warmup: int = 3,
                  batches=(1, 2), memory: bool = True, root: str = ".", log: Callable = print) -> BenchmarkResult:
    """Export the variants of ``config``'s model and measure them side by side."""
    paddle.set_device("cpu")
    size = config.input_size()
    built, variants = export_variants(config, workdir, log)
    runtimes = cpu_runtimes(threads) + gpu_runtimes()
    if onnx_available():
        runtimes.append(Runtime(ONNX_RUNTIME, inference.PredictorOptions(cpu_threads=threads)))
    inputs_by_batch, references = {}, {}
    for batch in batches:
        inputs, bbox, num = reference_detections(built.training_model, size, batch)
        inputs_by_batch[batch], references[batch] = inputs, (bbox, num)
    flops = conv_flops(built.training_model, size)
    ok = sum(1 for v in variants.values() if not v.error)
    total = ok * len(runtimes) * len(batches) * (runs + warmup)  # an upper bound: ONNX only for one variant
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=f"{config.name} latency", unit="run", file=sys.stderr)
        tick = lambda: bar.update(1)  # noqa: E731
    except ImportError:
        bar, tick = None, None
    # the export check's tolerance, in pixels: 1e-4 of the input size
    measurements = measure(variants, runtimes, inputs_by_batch, references, runs, warmup, 1e-4 * max(size), tick)
    if bar:
        bar.close()
    mem = export_memory(os.path.abspath(config.path), root, workdir) if memory else {}
    return BenchmarkResult(config, variants, measurements, flops, mem, threads)


def markdown(result: BenchmarkResult, peak: float, peak_note: str) -> str:
    """The tables of one config's run."""
    cfg = result.config
    base_runtime = "CPU oneDNN, default passes"
    lines = [f"### {cfg.name} ({cfg.input_size()[0]}x{cfg.input_size()[1]}, random weights)", "",
             "| variant | runtime | batch | median ms | p90 ms | vs ppdet path, default passes | detections vs dygraph |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for m in result.measurements:
        base = result.cell("ppdet path", base_runtime, m.batch)
        if m.error:
            lines.append(f"| {m.variant} | {m.runtime} | {m.batch} | - | - | - | fails: {m.error} |")
            continue
        ratio = m.median / base.median if base and base.times else float("nan")
        lines.append(f"| {m.variant} | {m.runtime} | {m.batch} | {m.median * 1e3:.1f} | {m.p90 * 1e3:.1f} | "
                     f"{ratio:.2f}x | {m.parity} |")
    lines += ["", "| variant | conv2d | batch_norm | add | if | params MB | conversion s | verification s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in result.variants.values():
        if v.error:
            lines.append(f"| {v.name} | export failed: {v.error} | | | | | | |")
            continue
        counts = " | ".join(str(v.ops.get(op, 0)) for op in COUNTED)
        lines.append(f"| {v.name} | {counts} | {v.params_bytes / 2**20:.1f} | {v.prepare_seconds:.3f} | "
                     f"{v.verify_seconds:.3f} |")
    best = result.cell("ppfuse deploy", "CPU oneDNN, ppfuse passes", 1)
    base = result.cell("ppdet path", base_runtime, 1)
    lines.append("")
    if best and best.times and base and base.times:
        lines.append(f"- ppfuse deploy with ppfuse passes vs ppdet path with default passes, batch 1: "
                     f"**{best.median / base.median:.2f}x** latency ({best.median * 1e3:.1f} ms vs "
                     f"{base.median * 1e3:.1f} ms)")
        rate = result.flops / best.median
        lines.append(f"- model {result.flops / 1e9:.2f} GFLOP per image (2 x multiply-adds of every conv, direct "
                     f"convolution); ppfuse deploy runs at {rate / 1e9:.1f} GFLOP/s = {rate / (peak * result.threads):.0%} "
                     f"of a nominal {result.threads}-thread peak of {peak * result.threads / 1e9:.0f} GFLOP/s "
                     f"({peak_note}; the VM's clock may boost above it, and oneDNN may use Winograd, so this "
                     "is an estimate of the distance to the limit, not a bound)")
    if result.memory:
        values = list(result.memory.values())
        lines.append("- peak memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in result.memory.items()) +
                     f" (ratio {values[1] / values[0]:.2f}x)")
    spreads = [float(np.percentile(m.times, 90) / np.median(m.times)) for m in result.measurements if m.times]
    if spreads:
        lines.append(f"- spread: p90/median from {min(spreads):.2f} to {max(spreads):.2f} across cells")
    return "\n".join(lines) + "\n"


def plot(results: List[BenchmarkResult], path: str) -> Optional[str]:
    """A PNG bar chart of batch-1 median latency per variant and runtime; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.2), squeeze=False)
    for ax, result in zip(axes[0], results):
        runtimes = list(dict.fromkeys(m.runtime for m in result.measurements))
        width = 0.8 / len(VARIANTS)
        for i, variant in enumerate(VARIANTS):
            values = []
            for runtime in runtimes:
                cell = result.cell(variant, runtime, 1)
                values.append(cell.median * 1e3 if cell and cell.times else 0.0)
            xs = [j + i * width for j in range(len(runtimes))]
            ax.bar(xs, values, width, label=variant)
        ax.set_xticks([j + width for j in range(len(runtimes))])
        ax.set_xticklabels([r.replace("CPU ", "").replace(", ", "\n") for r in runtimes], fontsize=8)
        ax.set_ylabel("median latency, batch 1 (ms)")
        ax.set_title(f"{result.config.name} {result.config.input_size()[0]}px, {result.threads} threads")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
