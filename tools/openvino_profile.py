"""Where OpenVINO spends an export's inference time, per precision: its per-node performance counters.

    python tools/openvino_profile.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        [--precisions fp32 bf16 int8] [--runs 20] [--threads 2] [--top 12] [--output_dir output/openvino_profile]

For each precision (int8 needs model_int8.onnx, tools/quantize.py) the export runs --runs times on a generated
image with OpenVINO's PERF_COUNT on; the table gives milliseconds per run by node type and kernel (which
names the implementation and precision it ran), and the total the counters add up to. Run nothing else meanwhile.
Writes output_dir/openvino_profile.md and the dated result <results_dir>/openvino_profile/<date>_<cpu>.md and
.json (--results_dir '' or --no_results: none).
"""
import os
import sys
import warnings

if "--debug" not in sys.argv:
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--model_dir", required=True, help="an export with model.onnx (and model_int8.onnx)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="rows per precision (the rest summed as 'other')")
    parser.add_argument("--output_dir", default="output/openvino_profile")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    import numpy as np
    from ppfuse import runtime
    from ppfuse.deploy.inference import Preprocess
    from ppfuse.runtime.openvino_runtime import OpenVINO
    image = np.random.RandomState(0).uniform(0, 255, (480, 640, 3)).astype("uint8")
    feeds = Preprocess.from_infer_cfg(args.model_dir)(image)
    lines = [f"CPU: {runtime.cpu_description()}; {args.threads} threads; {args.runs} runs after one warm-up; "
             f"`{args.model_dir}`", ""]
    profiles = []
    for precision in args.precisions:
        model = OpenVINO(args.model_dir, runtime.RuntimeOptions(precision=precision, cpu_threads=args.threads),
                         perf_count=True)
        report = model.confirm_precision(feeds)
        times = model.profile(feeds, args.runs)
        total = sum(times.values())
        ranked = sorted(times.items(), key=lambda kv: -kv[1])
        rows = [[node_type, f"`{kernel}`", f"{ms:.2f}", f"{ms / total:.0%}"] for (node_type, kernel), ms in
                ranked[:args.top]]
        rest = sum(ms for _, ms in ranked[args.top:])
        if rest:
            rows.append([f"other ({len(ranked) - args.top} kinds)", "", f"{rest:.2f}", f"{rest / total:.0%}"])
        lines += [f"### {precision}: {total:.1f} ms per run (sum of node counters); {report.line()}", "",
                  results.table(["node type", "kernel", "ms per run", "share"], rows, "llrr"), ""]
        profiles.append({"precision": precision, "ran": report.line(), "total_ms_per_run": total,
                         "nodes": [{"node_type": node_type, "kernel": kernel, "ms_per_run": ms}
                                   for (node_type, kernel), ms in ranked]})
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "openvino_profile.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(f"wrote {path}")
    data = {"model_dir": args.model_dir, "threads": args.threads, "runs": args.runs, "profiles": profiles}
    result = results.write("openvino_profile", "OpenVINO profile", text, data, results_dir,
                           results.command_line(__file__, argv), files=[path])
    if result:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
