"""Per-layer int8 quantization error (SQNR) of the deployed convs of one or more exports, as a table and a plot.

    python tools/quantization_error.py --model_dir output/shapes_10e/inference/ppyoloe_plus_crn_s_shapes \
        [--model_dir output/shapes_qarepvgg_10e/inference/ppyoloe_plus_crn_s_shapes_qarepvgg ...] \
        [--name RepVGG --name QARepVGG] [--image_dir dataset/shapes/train] [--images 32] \
        [--calibration minmax] [--per_tensor] [--activation_type uint8] [--output_dir output/quantization_error]

Each export's model.onnx is quantized as tools/quantize.py does (into a temporary
file: the export is left as it is) on the first --images images of --image_dir,
and on those images every conv's output is compared int8 vs fp32:
SQNR = 10 log10(sum(y_fp32^2) / sum((y_int8 - y_fp32)^2)) dB, higher is better.
Also each conv's weights alone in int8, per output channel and per tensor.
Prints a Markdown summary (median, worst layer) and writes quantization_error.md
(with the per-layer table) and quantization_error.png (needs matplotlib: [bench]) to --output_dir,
and the dated result <results_dir>/sqnr/<date>_<cpu>.md and .json (--results_dir '' or --no_results: none).
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
    parser.add_argument("--model_dir", action="append", required=True, help="an export with model.onnx "
                        "(repeatable: models side by side)")
    parser.add_argument("--name", action="append", default=[], help="a column name per --model_dir "
                        "(default: the directory's name)")
    from ppfuse.deploy import quantize
    quantize.add_arguments(parser)
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--output_dir", default="output/quantization_error")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    from ppfuse import runtime
    from ppfuse.errors import ConfigError
    from ppfuse.measure import sqnr
    settings = quantize.settings_from_args(args)
    if args.name and len(args.name) != len(args.model_dir):
        raise ConfigError(f"--name given {len(args.name)} times for {len(args.model_dir)} --model_dir")
    names = args.name or [os.path.basename(os.path.normpath(d)) for d in args.model_dir]
    models = []
    for directory in args.model_dir:
        models.append(sqnr.measure_export(directory, args.image_dir, settings, args.cpu_threads))
    import datetime
    header = (f"Measured {datetime.date.today()} on {runtime.cpu_description()}; {settings.describe()}, images "
              f"from {args.image_dir}, SQNR on the same images (ONNX Runtime, QDQ evaluated as written).")
    summary = sqnr.summary_table(models, names)
    text = f"{header}\n\n{summary}\n\n{sqnr.layer_table(models, names)}\n"
    tables = os.path.join(args.output_dir, "quantization_error.md")
    plot = os.path.join(args.output_dir, "quantization_error.png")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        sqnr.plot_errors(models, names, plot)
        with open(tables, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(f"{args.output_dir}: cannot write ({exc.strerror})")
    print(f"{header}\n\n{summary}\n\nwrote {args.output_dir}/quantization_error.md and quantization_error.png")
    data = {"settings": settings, "image_dir": args.image_dir,
            "models": [{"name": name, "model_dir": model.model_dir, "images": model.images, "layers": model.layers}
                       for name, model in zip(names, models)]}
    result = results.write("sqnr", "Quantization error (SQNR)", text, data, results_dir,
                           results.command_line(__file__, argv), files=[tables, plot])
    if result:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
