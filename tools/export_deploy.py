"""Export a PaddleDetection config's model in deploy form for Paddle Inference.

    python tools/export_deploy.py -c configs/ppyoloe/ppyoloe_plus_crn_s_80e_coco.yml \
        [-o weights=PATH key=value ...] [--output_dir output_inference]

Builds the model, loads the weights (training or ppfuse deploy checkpoint; none
-> random weights, for trying the tool only), converts every block, verifies
the deployed model against the training form and writes
``<output_dir>/<config name>/`` -- all files or none.
"""
import os
import sys
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def log(message):
    print(message, file=sys.stderr if message.startswith("WARNING") else sys.stdout)


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="output_inference", help="where <config name>/ is written")
    parser.add_argument("--atol", type=float, default=None, help="verification tolerance, absolute, on boxes/input size and scores (default 1e-4)")
    parser.add_argument("--rtol", type=float, default=None, help="verification tolerance, relative (default 1e-4)")
    parser.add_argument("--no_nms", action="store_true", help="export raw (boxes, scores) without NMS")
    parser.add_argument("--input_size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="export size: sets the TestReader's image_shape and the shared eval_size (which "
                        "PP-YOLOE heads precompute anchors for) together; multiples of 32")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and check inputs")
    parser.add_argument("--strict", action="store_true", help="fail if any BatchNorm would stay unfolded")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (needs the [onnx] extra; every "
                        "family that exports; an operator paddle2onnx cannot convert is named)")
    parser.add_argument("--image_only", action="store_true", help="the plain graph: one input, image [N,3,H,W], "
                        "boxes in input pixels (after NMS; with --no_nms the raw boxes and scores); "
                        "docs/plain-graph.md")
    parser.add_argument("--conv_bias", choices=["in_conv", "channel_add"], default="in_conv",
                        help="how model.json writes conv biases: in_conv (default: Paddle's own form, fused into "
                        "the conv by oneDNN; model_plain.json holds the other form, which ppfuse's Paddle Inference "
                        "runs with oneDNN off) or channel_add (a [C,1,1] add, faster with oneDNN off at batch > 1; "
                        "for readers of model.json that run without oneDNN)")
    args = parser.parse_args(argv)

    from ppfuse.ppdet import detection, export
    config = detection.load_config(args.config, args.opt, input_size=args.input_size)
    if config.weights and "weights" not in config.overrides and not detection.weights_file_exists(config.weights):
        # PaddleDetection's own configs name the checkpoint their training would write
        print(f"WARNING: the config's weights ({config.weights}) do not exist; give trained weights with "
              "-o weights=PATH.", file=sys.stderr)
        config.values["weights"] = None
    if not config.weights:
        print("WARNING: no weights given (-o weights=PATH): exporting RANDOM weights with randomized "
              "BatchNorm statistics. The result only shows the tool working; it detects nothing.",
              file=sys.stderr)
    tolerance = {k: v for k, v in (("atol", args.atol), ("rtol", args.rtol)) if v is not None}
    result = export.export(config, args.output_dir, seed=args.seed, with_nms=not args.no_nms, strict=args.strict,
                           onnx=args.onnx, conv_bias=args.conv_bias, log=log, image_only=args.image_only,
                           **tolerance)
    conversion = result.built.conversion
    if conversion is not None:
        confirmed = ("every fold confirmed against the traced program" if conversion.confirmed_by_trace
                     else f"{len(conversion.unconfirmed)} folds not confirmed by a trace")
        print(f"{conversion.summary().splitlines()[0]}; {confirmed}")
    ops = result.op_counts
    print(f"saved program ops: conv2d {ops.get('conv2d', 0)}, batch_norm {ops.get('batch_norm', 0)}, "
          f"if {ops.get('if', 0)}, add {ops.get('add', 0)} (of which {ops.get('add_tensors', 0)} add two "
          "activations: the residual shortcuts; the rest are conv biases)")
    print(f"wrote {result.directory}/ (" + ", ".join(sorted(os.listdir(result.directory))) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
