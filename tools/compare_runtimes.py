"""Run one export in every runtime x precision on the same images and compare the detections.

    python tools/compare_runtimes.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        (--image_file demo.jpg | --image_dir images/) [--threshold 0.3] [--box_tolerance 1.0] \
        [--cpu_threads 2] [--output_dir output/compare_runtimes]

Reference: Paddle Inference fp32. Every other CPU runtime x precision that can run here (ONNX Runtime and
OpenVINO need model.onnx: export with --onnx; int8 needs model_int8.onnx from tools/quantize.py; bf16 a CPU
with bf16 instructions) is paired detection by detection with it: same class, box corners within
--box_tolerance pixels. The table (counts, pairs, largest box and score differences, the highest score left
unpaired, and the precision each runtime says it ran) is printed and written to output_dir/compare_runtimes.md,
and as the dated result <results_dir>/runtime_parity/<date>_<cpu>.md and .json (--results_dir '' or
--no_results: none).
An export of random weights gets a warning: its saturated scores make NMS keep arbitrary tied boxes.
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
    cli.add_export_and_images(parser)
    parser.add_argument("--threshold", type=float, default=0.3, help="score threshold of the compared detections")
    parser.add_argument("--box_tolerance", type=float, default=1.0, help="pixels; a pair's box corners within it")
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--output_dir", default="output/compare_runtimes")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    from ppfuse.deploy import inference
    from ppfuse.measure import runtime_parity
    paths = inference.list_images(args.image_file or args.image_dir)
    images = [inference.read_image(p) for p in paths]
    rows, random_weights = runtime_parity.compare(args.model_dir, images, args.threshold, args.cpu_threads,
                                                  args.box_tolerance, log=lambda m: print(m, file=sys.stderr))
    text = runtime_parity.markdown(rows, args.model_dir, len(images), args.threshold, args.box_tolerance,
                                   random_weights)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "compare_runtimes.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")
    data = runtime_parity.to_data(rows, args.model_dir, len(images), args.threshold, args.box_tolerance,
                                  random_weights)
    result = results.write("runtime_parity", "Runtime parity", text, data, results_dir,
                           results.command_line(__file__, argv), files=[path])
    if result:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
