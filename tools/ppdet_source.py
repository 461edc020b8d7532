"""ppfuse on a source checkout of PaddleDetection (its develop branch: RT-DETR, PP-YOLOE-Seg), side by side with
PaddleDetection's own export.

    PYTHONPATH=/path/to/PaddleDetection python tools/ppdet_source.py --ppdet_dir /path/to/PaddleDetection \
        -c configs/rtdetr/rtdetr_r18vd_6x_coco.yml [-c ...] [--input_size 640 640] [--runs 10] [--threads 2] \
        [--onnx [--precisions fp32 bf16 int8]]

For each config (relative to --ppdet_dir): random weights (seeded; BatchNorm statistics from generated images)
are saved as a checkpoint; ppfuse exports it (tools/export_deploy.py's path: convert, verify, write) and
PaddleDetection's own tools/export_model.py exports the same checkpoint; both programs then run in Paddle
Inference (oneDNN, fp32) on the same generated image, rounds interleaved, and their latency is reported side by
side. What each step gave (converted blocks, BatchNorm left, the verification, a failure's first line) goes to
the table and to the dated result <results_dir>/ppdet_source/<date>_<cpu>.md and .json.
The checkout is used as it is: install its dependencies without its stale pins (docs/install.md).
"""
import os
import subprocess
import sys
import tempfile
import time
import warnings

if "--debug" not in sys.argv:
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def _own_export(ppdet_dir, config, weights, size, output_dir):
    """PaddleDetection's tools/export_model.py on ``weights``: the program directory, or the failure's last line."""
    command = [sys.executable, os.path.join(ppdet_dir, "tools", "export_model.py"), "-c", config, "-o",
               f"weights={weights}", "use_gpu=false", f"TestReader.inputs_def.image_shape=[3,{size[0]},{size[1]}]",
               f"eval_size=[{size[0]},{size[1]}]", "--output_dir", output_dir]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ppdet_dir, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ppdet_dir, timeout=1800)
    directory = os.path.join(output_dir, os.path.splitext(os.path.basename(config))[0])
    if done.returncode != 0 or not os.path.isfile(os.path.join(directory, "model.pdiparams")):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return None, (lines[-1] if lines else f"exit code {done.returncode}")[:300]
    return directory, None


def _predictor(directory, threads, onednn):
    from paddle import inference as paddle_inference
    program = next(os.path.join(directory, name) for name in ("model.json", "model.pdmodel")
                   if os.path.isfile(os.path.join(directory, name)))
    config = paddle_inference.Config(program, os.path.join(directory, "model.pdiparams"))
    config.disable_gpu()
    if onednn:
        config.enable_onednn()
    else:
        config.disable_onednn()
    config.set_cpu_math_library_num_threads(threads)
    config.disable_glog_info()
    return paddle_inference.create_predictor(config)


def _feed(predictor, size):
    import numpy as np
    for name, value in _feeds(size, predictor.get_input_names()).items():
        predictor.get_input_handle(name).copy_from_cpu(np.ascontiguousarray(value))


def _time(predictors, size, runs, warmup, others=None, feeds=None):
    """Median ms of each predictor and of each ppfuse runtime in ``others`` (run on ``feeds``), rounds
    interleaved (one run of each per round); a predictor that fails its first run is left out, its error's first
    line in the second dict."""
    import numpy as np
    from ppfuse.errors import first_line
    failed = {}
    others = others or {}
    for name, predictor in list(predictors.items()):
        _feed(predictor, size)
        try:
            for _ in range(warmup):
                predictor.run()
        except Exception as exc:  # Paddle Inference cannot run this program in this setting
            failed[name] = first_line(exc)[:200]
            del predictors[name]
    for runtime in others.values():
        for _ in range(warmup):
            runtime.run(feeds)
    calls = {name: predictor.run for name, predictor in predictors.items()}
    calls.update({name: (lambda runtime=runtime: runtime.run(feeds)) for name, runtime in others.items()})
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}, failed


def _onnx_cells(directory, size, precisions, threads, work):
    """ppfuse's export in ONNX Runtime and OpenVINO: ``{cell: runtime}`` to time (each cell's detections on the
    generated image paired with Paddle Inference fp32's) and ``{cell: what it gave}`` for the table."""
    from ppfuse.deploy import quantize
    from ppfuse.deploy.inference import split_detections
    from ppfuse.errors import first_line
    from ppfuse.measure.coverage import calibration_images
    from ppfuse.measure.runtime_parity import match_outputs
    from ppfuse.runtime import CPU_PRECISIONS, RuntimeOptions, available, load
    from ppfuse.runtime.base import bf16_supported
    paddle_runtime = load(directory, "paddle", RuntimeOptions(cpu_threads=threads))
    feeds = _feeds(size, paddle_runtime.input_names)
    reference = split_detections(*list(paddle_runtime.run(feeds).values())[:2])[0]
    runtimes, cells = {}, {}
    if "int8" in precisions:
        try:
            quantize.quantize_export(directory, calibration_images(os.path.join(work, "calibration"), size, 4),
                                     quantize.QuantizeSettings(images=4), log=lambda message: None)
        except Exception as exc:
            cells["int8 (tools/quantize.py)"] = f"failed: {first_line(exc)[:200]}"
            precisions = [p for p in precisions if p != "int8"]
    for name in ("onnxruntime", "openvino"):
        for precision in precisions:
            cell = f"{name} {precision}"
            if not available(name):
                cells[cell] = "not installed"
                continue
            if precision not in CPU_PRECISIONS[name]:
                continue  # ONNX Runtime has no bf16 on CPU
            if precision == "bf16" and not bf16_supported():
                cells[cell] = "no bf16 on this CPU"
                continue
            try:
                runtime = load(directory, name, RuntimeOptions(precision=precision, cpu_threads=threads))
                cells[cell] = match_outputs(reference, list(runtime.run(feeds).values())).cell
                runtimes[cell] = runtime
            except Exception as exc:
                cells[cell] = f"failed: {first_line(exc)[:200]}"
    return runtimes, cells, feeds


def _feeds(size, names):
    from ppfuse.ppdet import detectors
    values = {k: v.numpy() for k, v in detectors.generated_inputs(size, 1, 5).items()}
    return {name: values[name] for name in names}


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--ppdet_dir", required=True, help="a PaddleDetection checkout (also put it on PYTHONPATH)")
    parser.add_argument("-c", "--config", action="append", required=True, help="config, relative to --ppdet_dir")
    parser.add_argument("--input_size", type=int, nargs=2, default=[640, 640], metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output_dir", default="output/ppdet_source")
    parser.add_argument("--onnx", action="store_true",
                        help="also model.onnx, run in ONNX Runtime and OpenVINO (see --precisions)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"], choices=["fp32", "bf16", "int8"])
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)
    ppdet_dir = os.path.abspath(args.ppdet_dir)
    sys.path.insert(0, ppdet_dir)

    import ppdet
    from ppfuse.core.checkpoint import save_state
    from ppfuse.errors import PPFuseError, first_line
    from ppfuse.ppdet import detection, export
    commit = getattr(ppdet, "__git_commit__", None) or "unknown"
    rows = []
    for name in args.config:
        path = os.path.join(ppdet_dir, name)
        row = {"config": name, "ppfuse": None, "converted": None, "left": None, "verification": None,
               "own": None, "ms": {}, "not_run": {}, "runtimes": {}}
        os.makedirs(args.output_dir, exist_ok=True)
        work = tempfile.mkdtemp(prefix="weights_", dir=args.output_dir)
        weights, result = None, None
        try:
            config = detection.load_config(path, [], input_size=args.input_size)
            config.values["weights"] = None
            built = detection.build_model(config, deploy=False, seed=0)
            weights = os.path.join(work, "random.pdparams")
            save_state(built.model, weights)
            result = export.export(config, os.path.join(args.output_dir, "ppfuse"), weights=weights,
                                   with_nms=True, onnx=args.onnx, log=lambda message: None)
            conversion = result.built.conversion
            row.update(ppfuse="ok", converted=dict(conversion.counts), left=len(conversion.remaining_batch_norms),
                       verification=result.verification.brief())
        except PPFuseError as exc:
            row["ppfuse"] = f"error: {first_line(exc)[:300]}"
            result = None
        except Exception as exc:  # a failure of the checkout's own code: one line, the sweep goes on
            row["ppfuse"] = f"failed: {first_line(exc)[:300]}"
            result = None
        own_dir, own_error = (None, "not run: no checkpoint") if weights is None else _own_export(
            ppdet_dir, path, weights, args.input_size, os.path.join(args.output_dir, "own"))
        row["own"] = "ok" if own_dir else f"failed: {own_error}"
        predictors = {}
        for key, directory in (("ppfuse", result.directory if result is not None else None), ("own", own_dir)):
            for onednn in (True, False):
                if directory is not None:
                    predictors[f"{key} {'oneDNN' if onednn else 'no oneDNN'}"] = _predictor(directory, args.threads,
                                                                                           onednn)
        others, feeds = {}, None
        if args.onnx and result is not None:
            others, row["runtimes"], feeds = _onnx_cells(result.directory, args.input_size, args.precisions,
                                                         args.threads, work)
        if predictors:
            row["ms"], row["not_run"] = _time(predictors, args.input_size, args.runs, args.warmup, others, feeds)
        print(f"{name}: ppfuse {row['ppfuse']}; PaddleDetection's export {row['own']}; "
              + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items())
              + "".join(f"; {k} does not run: {v}" for k, v in row["not_run"].items()))
        rows.append(row)

    cells = ["ppfuse oneDNN", "ppfuse no oneDNN", "own oneDNN", "own no oneDNN"]

    def latency(row, cell):
        if cell in row["ms"]:
            return f"{row['ms'][cell]:.1f}"
        return f"does not run: {row['not_run'][cell]}" if cell in row["not_run"] else "-"
    body = (f"PaddleDetection source checkout `{ppdet_dir}`, commit `{commit}`; input {args.input_size}, random "
            f"weights, Paddle Inference fp32 on CPU, {args.threads} threads, median ms of {args.runs} runs after "
            f"{args.warmup} warm-up, rounds interleaved; whole detector (post-processing included). \"own\" is "
            "PaddleDetection's tools/export_model.py on the same checkpoint.\n\n"
            + results.table(["config", "ppfuse export", "converted", "BatchNorm left", "verification",
                             "PaddleDetection's export"],
                            [[r["config"], r["ppfuse"], r["converted"], r["left"], r["verification"], r["own"]]
                             for r in rows])
            + "\n\n" + results.table(["config"] + [f"{c} ms" for c in cells],
                                     [[r["config"]] + [latency(r, c) for c in cells] for r in rows]))
    runtime_cells = sorted({cell for row in rows for cell in row["runtimes"]})
    if runtime_cells:
        body += ("\n\nppfuse's export in ONNX Runtime and OpenVINO: detections on the generated image paired with "
                 "Paddle Inference fp32's (same class, corners within 1 px), and median ms in the same rounds as "
                 "above\n\n" + results.table(
                     ["config"] + runtime_cells,
                     [[r["config"]] + [r["runtimes"].get(c, "-") + (f"; {r['ms'][c]:.1f} ms" if c in r["ms"] else "")
                                       for c in runtime_cells] for r in rows]))
    print(body)
    written = results.write("ppdet_source", "ppfuse on a PaddleDetection source checkout", body,
                            {"ppdet_dir": ppdet_dir, "commit": commit, "rows": rows}, results_dir,
                            results.command_line("tools/ppdet_source.py", argv))
    if written:
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
