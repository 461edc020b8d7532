"""Which PaddleDetection detector families ppfuse converts, verifies, exports and runs: one row per config.

    python tools/family_coverage.py [CONFIG ...] [--size 320] [--rounds 5] [--onnx] [--output_dir output/coverage]

Default configs: every detector config shipped in configs/ (one per family). For each: BatchNorms before
and left after conversion (and in the saved program), whether a trace confirmed every fold, the verification
error against the training form, export + a Paddle Inference run, and the latency of the training form vs the
export in Paddle Inference (interleaved, median of --rounds, random weights); with --onnx also model.onnx, its
detections in ONNX Runtime and OpenVINO against Paddle Inference's, and int8. Run nothing else meanwhile.
Writes output_dir/coverage.md and .json, and the dated result <results_dir>/coverage/<date>_<cpu>.md and
.json (--results_dir '' or --no_results: none).
"""
import glob
import os
import sys
import warnings

if "--debug" not in sys.argv:
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("configs", nargs="*", help="config files (default: one per family shipped in configs/)")
    parser.add_argument("--size", type=int, default=None, help="square input size for every config (default: "
                        "each config's TestReader size)")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each form (0: no latency)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of Paddle Inference")
    parser.add_argument("--output_dir", default="output/coverage", help="where coverage.md and .json go")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx, run it in ONNX Runtime and "
                        "OpenVINO against Paddle Inference, quantize it and run int8 (the [onnx], [openvino] and "
                        "[int8] extras)")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)
    from ppfuse import runtime
    from ppfuse.measure import coverage
    paths = args.configs or coverage.FAMILY_CONFIGS
    missing = [p for p in paths if not glob.glob(p)]
    if missing:
        raise SystemExit(f"{missing[0]}: config file not found")
    overrides = coverage.size_overrides(args.size)
    print(f"CPU: {runtime.cpu_description()}; {args.threads} threads; random weights")
    rows = [coverage.cover(p, overrides, rounds=args.rounds, threads=args.threads, onnx=args.onnx) for p in paths]
    note = (f"CPU: {runtime.cpu_description()}, Paddle Inference {args.threads} threads, batch 1, random weights "
            f"with randomized BatchNorm statistics, median of {args.rounds} interleaved runs" +
            ("; ONNX columns: model.onnx with the export's check, detections of the export check's generated "
             "image (values in [0, 1]) paired with Paddle Inference fp32's (same class, corners within 1 px; bf16 "
             "and int8 move random-weight scores and boxes enough that NMS keeps other boxes: those columns say "
             "that it runs and how close it stays, not accuracy -- that is tools/accuracy_parity.py's), int8 "
             "calibrated on two generated images" if args.onnx else ""))
    path = coverage.write(rows, args.output_dir, note)
    print("\n" + coverage.markdown(rows) + f"\nwrote {path}")
    result = results.write("coverage", "Family coverage", coverage.markdown(rows, note), coverage.to_data(rows),
                           results_dir, results.command_line(__file__, argv), files=[path])
    if result:
        print(f"wrote {result}")
    return 0 if all(not r.failed_step for r in rows) else 1


if __name__ == "__main__":
    sys.exit(cli.main(run))
