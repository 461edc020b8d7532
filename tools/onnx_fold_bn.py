"""Fold BatchNormalization into the preceding Conv of any ONNX model, verified with ONNX Runtime.

    python tools/onnx_fold_bn.py model.onnx model_folded.onnx [--input_shape x=1,3,224,224]

Only a BN whose input is a Conv output used by nothing else, with constant
weights and statistics, is folded; every other BN is listed with the reason.
The folded model's outputs are compared with the original's on generated
inputs (relative to each output's scale, atol/rtol 1e-5); above that, nothing
is written.
"""
import os
import sys
import tempfile
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--input_shape", action="append", default=[], metavar="NAME=D1,D2,...",
                        help="shape of an input with dynamic dims (repeatable)")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--rtol", type=float, default=1e-5)
    args = parser.parse_args(argv)

    from ppfuse.deploy import onnx_support
    from ppfuse.errors import ExportError, VerificationError
    if not os.path.isfile(args.input):
        raise ExportError(f"{args.input}: ONNX model not found")
    shapes = {}
    for item in args.input_shape:
        name, _, dims = item.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ExportError(f"--input_shape {item!r}: use NAME=D1,D2,... e.g. x=1,3,224,224") from None
    out_dir = os.path.dirname(os.path.abspath(args.output))
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        staged = os.path.join(tmp, "folded.onnx")
        result = onnx_support.fold_batch_norms(args.input, staged)
        check = onnx_support.verify_fold(args.input, staged, shapes, args.atol, args.rtol)
        if not check.ok:
            raise VerificationError(f"{args.input}: folded model differs beyond tolerance: {check.summary()}")
        os.replace(staged, args.output)
    print(f"folded {result['folded']} BatchNormalization; {len(result['left'])} left")
    for name, why in result["left"].items():
        print(f"  left {name}: {why}")
    print(f"verified with ONNX Runtime: {check.summary().splitlines()[0]}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
