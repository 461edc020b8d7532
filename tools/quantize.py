"""Quantize an export to int8: model_int8.onnx (QDQ, for ONNX Runtime) and model_int8.xml (NNCF, for OpenVINO).

    python tools/quantize.py --model_dir output_inference/ppyoloe_plus_crn_s_320_test \
        [--image_dir dataset/shapes/train] [--images 32] [--calibration minmax|entropy|percentile] \
        [--per_tensor] [--activation_type uint8|int8] [--symmetric_activations] [--openvino_int8 nncf|qdq] \
        [--check onnxruntime openvino]

Both are calibrated on the first --images images of --image_dir, preprocessed as the export's
infer_cfg.yml says. model_int8.onnx: ONNX Runtime's static quantization (quantize_static, QDQ format),
Conv only, int8 weights per output channel (--per_tensor: one scale per kernel), uint8 activations.
model_int8.xml (+ .bin): NNCF, OpenVINO's quantizer, on the model OpenVINO converts from model.onnx
(asymmetric activations; --symmetric_activations: NNCF's PERFORMANCE preset); --openvino_int8 qdq writes
none and OpenVINO runs model_int8.onnx. Both are recorded in ppfuse_report.json ("int8").
Run them with tools/infer.py --runtime onnxruntime|openvino --precision int8.
--check loads them in those runtimes and prints how many convolutions ran int8.
Needs the [int8] extra: pip install -c constraints.txt -e ".[int8]"
"""
import os
import sys
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--model_dir", required=True, help="directory written by tools/export_deploy.py --onnx")
    from ppfuse.deploy import quantize
    quantize.add_arguments(parser)
    parser.add_argument("--check", nargs="*", default=[], metavar="RUNTIME",
                        help="load the int8 model in these runtimes (onnxruntime, openvino) and print what ran")
    parser.add_argument("--cpu_threads", type=int, default=2)
    args = parser.parse_args(argv)

    from ppfuse import runtime
    from ppfuse.errors import ConfigError
    settings = quantize.settings_from_args(args)
    for name in args.check:
        if "int8" not in runtime.CPU_PRECISIONS.get(name, ("int8",)):
            raise ConfigError(f"--check {name}: int8 runs in onnxruntime or openvino")
        runtime.runtime_class(name)
    result = quantize.quantize_export(args.model_dir, args.image_dir, settings)
    print(result.line())
    if args.check:
        inputs = quantize.calibration_inputs(args.model_dir, result.images[:1])[0]
        print(f"CPU: {runtime.cpu_description()}")
        for name in args.check:
            model = runtime.load(args.model_dir, name, runtime.RuntimeOptions(precision="int8",
                                                                              cpu_threads=args.cpu_threads))
            print(f"{model.settings()}: {model.confirm_precision(inputs).line()}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
