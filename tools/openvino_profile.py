"""Where OpenVINO spends an export's inference time, per precision: its per-node performance counters.

    python tools/openvino_profile.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        [--precisions fp32 bf16 int8] [--int8_rest fp32|bf16] [--runs 20] [--threads 2] [--top 12] \
        [--output_dir output/openvino_profile]

For each precision (int8 needs model_int8.onnx, tools/quantize.py) the export runs --runs times on a generated
image with OpenVINO's PERF_COUNT on; the table gives milliseconds per run by node type and kernel (which
names the implementation and precision it ran), and the total the counters add up to; then the convolutions
grouped by geometry (channels, kernel, input and output size) with their milliseconds in each precision side by
side and the ratio of each precision to the first, to see which convolutions a lower precision speeds up. Run
nothing else meanwhile.
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


CONVOLUTIONS = ("Convolution", "GroupConvolution")


def geometry(node) -> str:
    """``Cin->Cout kxk, HxW->hxw`` of a convolution node (``groups g`` for a grouped one)."""
    weights, given, output = node["weights"] or [], node["input"] or [], node["output"] or []
    if len(weights) == 5:  # grouped: [G, Cout/G, Cin/G, kh, kw]
        text = f"{weights[0] * weights[2]}->{weights[0] * weights[1]} {weights[3]}x{weights[4]}, groups {weights[0]}"
    elif len(weights) == 4:
        text = f"{weights[1]}->{weights[0]} {weights[2]}x{weights[3]}"
    else:
        text = "?"
    if len(given) == 4 and len(output) == 4:
        text += f", {given[2]}x{given[3]}->{output[2]}x{output[3]}"
    return text


def convolution_table(profiles, results):
    """Convolutions grouped by :func:`geometry`: count, ms per run in each profiled precision, ratio to the
    first precision; sorted by the first precision's time."""
    precisions = [p["precision"] for p in profiles]
    groups = {}
    for profile in profiles:
        for node in profile["node_list"]:
            if node["node_type"] in CONVOLUTIONS:
                group = groups.setdefault(geometry(node), {"names": set()})
                group["names"].add(node["name"])
                group[profile["precision"]] = group.get(profile["precision"], 0.0) + node["ms"]
    first = precisions[0]
    ranked = sorted(groups.items(), key=lambda kv: -kv[1].get(first, 0.0))
    rows = []
    for key, group in ranked:
        row = [key, str(len(group["names"]))] + [f"{group[p]:.2f}" if p in group else "-" for p in precisions]
        row += [f"{group[p] / group[first]:.2f}" if p in group and group.get(first) else "-" for p in precisions[1:]]
        rows.append(row)
    totals = ["all convolutions", str(sum(len(g["names"]) for g in groups.values()))]
    sums = {p: sum(g.get(p, 0.0) for g in groups.values()) for p in precisions}
    totals += [f"{sums[p]:.2f}" for p in precisions]
    totals += [f"{sums[p] / sums[first]:.2f}" if sums[first] else "-" for p in precisions[1:]]
    rows.append(totals)
    header = (["convolution (channels, kernel, input->output)", "count"] + [f"{p} ms" for p in precisions]
              + [f"{p} / {first}" for p in precisions[1:]])
    return results.table(header, rows, "lr" + "r" * (len(header) - 2))


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--model_dir", required=True, help="an export with model.onnx (and model_int8.onnx)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="rows per precision (the rest summed as 'other')")
    parser.add_argument("--int8_rest", default="fp32", choices=["fp32", "bf16"],
                        help="int8: the precision of what is not quantized (bf16 needs a bf16 CPU)")
    parser.add_argument("--output_dir", default="output/openvino_profile")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    import numpy as np
    from ppfuse import runtime
    from ppfuse.deploy.inference import Preprocess
    from ppfuse.runtime.openvino_runtime import OpenVINO, by_kernel
    image = np.random.RandomState(0).uniform(0, 255, (480, 640, 3)).astype("uint8")
    feeds = Preprocess.from_infer_cfg(args.model_dir)(image)
    lines = [f"CPU: {runtime.cpu_description()}; {args.threads} threads; {args.runs} runs after one warm-up; "
             f"`{args.model_dir}`", ""]
    profiles = []
    for precision in args.precisions:
        rest = args.int8_rest if precision == "int8" else "fp32"
        model = OpenVINO(args.model_dir, runtime.RuntimeOptions(precision=precision, cpu_threads=args.threads,
                                                                int8_rest=rest), perf_count=True)
        report = model.confirm_precision(feeds)
        nodes = model.node_profile(feeds, args.runs)
        times = by_kernel(nodes)
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
                                   for (node_type, kernel), ms in ranked], "node_list": nodes})
    if len(profiles) > 1:
        lines += ["### Convolutions by geometry, ms per run in each precision", "",
                  convolution_table(profiles, results), ""]
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
