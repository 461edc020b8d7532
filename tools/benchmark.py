"""Benchmark export variants side by side in every runtime and precision: latency, ops, size, conversion, memory.

    python tools/benchmark.py -c configs/ppyoloe/ppyoloe_plus_crn_s_80e_coco.yml \
        [-c configs/ppyoloe/ppyoloe_plus_crn_l_80e_coco.yml] [--threads 2] [--runs 30] \
        [--output_dir output_bench] [--with_nms] [--delete_passes constant_folding_pass ...]

Any detector family the export handles (PicoDet, YOLOX, RetinaNet, DETR, PP-YOLOE-R, ...): without NMS, PP-YOLOE's
boxes and scores, another family's head outputs, each compared relative to its own scale (docs/measuring.md).
Rows: Paddle Inference (oneDNN fp32 and bf16, no oneDNN -- ppfuse deploy's model_plain.json there, the form
for that path), ONNX Runtime fp32 and int8, OpenVINO fp32, bf16 and int8 -- each that can
run here (extras installed; bf16 on a CPU with bf16 instructions), the others listed with the reason.
The CPU model and its ISA flags (avx512_bf16, AMX) head the tables. A run that follows another runtime's
run waits 0.3 s first, so that runtime's spinning threads do not take the cores (ppfuse/measure/benchmark.py).
Then the fastest fp32, bf16 and int8 rows of ppfuse deploy (batch 1) run again, beside the ppdet path, at
--throughput_batches (1 2 4 8): images per second at serving batch sizes.
Writes output_dir/benchmark.md (tables) and output_dir/benchmark.png (chart), and the dated result
<results_dir>/benchmark/<date>_<cpu>.md and .json (--results_dir '' or --no_results: none).
"""
import argparse
import datetime
import os
import sys
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="config (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per cell (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--throughput_batches", type=int, nargs="*", default=[1, 2, 4, 8], metavar="N",
                        help="batch sizes of the throughput table (images/s of the fastest fp32, bf16 and int8 "
                        "rows; default 1 2 4 8; none: no table)")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--with_nms", action="store_true", help="time the whole detector, NMS included "
                        "(default: up to boxes and scores; random weights give NMS unrealistically many boxes)")
    parser.add_argument("--delete_passes", nargs="+", action="append", default=[], metavar="PASS",
                        help="add a runtime row: oneDNN with these Paddle Inference passes deleted (repeatable)")
    parser.add_argument("--output_dir", default="output_bench")
    parser.add_argument("--debug", action="store_true", help=cli.DEBUG_HELP)
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    from ppfuse.measure import benchmark
    from ppfuse.ppdet import detection
    os.makedirs(args.output_dir, exist_ok=True)
    peak, peak_note = benchmark.peak_flops()
    runs = []
    for path in args.config:
        config = detection.load_config(path)
        workdir = os.path.join(args.output_dir, config.name)
        runs.append(benchmark.run_benchmark(config, workdir, args.threads, args.runs, args.warmup,
                                            tuple(args.batches), not args.no_memory, ROOT, args.with_nms,
                                            args.delete_passes, log=lambda m: print(m, file=sys.stderr),
                                            throughput_batches=tuple(args.throughput_batches)))
    header = (f"## Benchmark, {datetime.date.today().isoformat()}\n\n{benchmark.machine_description(args.threads)}; "
              f"{args.runs} timed runs per cell after {args.warmup} warm-up, rounds interleaved.\n"
              f"Command: `python tools/benchmark.py {' '.join(argv)}`\n\n")
    text = header + "\n".join(benchmark.markdown(r, peak, peak_note) for r in runs)
    tables = os.path.join(args.output_dir, "benchmark.md")
    with open(tables, "w") as f:
        f.write(text)
    png = benchmark.plot(runs, os.path.join(args.output_dir, "benchmark.png"))
    print(text)
    print(f"wrote {tables}" + (f" and {png}" if png else ""))
    data = {"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "peak_flops_per_core": peak,
            "peak_note": peak_note, "configs": [r.to_dict() for r in runs]}
    result = results.write("benchmark", "Benchmark", text, data, results_dir, results.command_line(__file__, argv),
                           files=[tables] + ([png] if png else []))
    if result:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
