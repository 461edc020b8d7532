"""Accuracy parity: COCO mAP of a trained PP-YOLOE+ in training form and as a ppfuse export in every runtime.

    python tools/accuracy_parity.py [-c configs/shapes/ppyoloe_plus_crn_s_shapes.yml] [--epochs N] \
        [--train_images 300 --val_images 100] [--output_dir output/shapes] [--weights PATH] [-o key=value ...] \
        [--runtimes paddle onnxruntime openvino] [--precisions fp32 bf16 int8] [--calibration_images 32] [--per_tensor]
        [--activation_type uint8|int8] [--symmetric_activations] [--openvino_int8 nncf|qdq] [--retrain]

1. writes the generated shapes dataset the config points at (dataset/shapes: train seed 0,
   val seed 1) unless it is already there;
2. trains from scratch with ppdet's Trainer on CPU (nothing is downloaded) -> <output_dir>/train/,
   once: a later run with the same config, epochs, seed and data reuses that checkpoint (--retrain
   trains again); --weights PATH skips training and evaluates that checkpoint instead;
3. COCO bbox mAP of the training-form dygraph model (ppdet's EvalReader and COCOMetric);
4. exports with ppfuse (with model.onnx when the [onnx] extra is installed) ->
   <output_dir>/inference/<config name>/ and runs every val image through every runtime x precision
   (Paddle Inference fp32 and bf16, ONNX Runtime fp32, OpenVINO fp32 and bf16; int8 when asked
   for: ONNX Runtime on model_int8.onnx, OpenVINO on NNCF's model_int8.xml (--openvino_int8 qdq:
   on model_int8.onnx too), quantized as tools/quantize.py does on the first --calibration_images
   training images) into the same COCOMetric; a runtime whose extra is
   missing, or bf16 on a CPU without bf16 instructions, is skipped with one line saying so;
5. prints a Markdown table (and what bf16 costs per runtime) and writes it to
   <output_dir>/accuracy.md (numbers: accuracy.json), and as a dated result to
   <results_dir>/accuracy/<date>_<cpu>.md and .json (--results_dir '' or --no_results: none).

Run from the repository root (dataset and output paths are relative, as in PaddleDetection).
For one core: OMP_NUM_THREADS=1 and --cpu_threads 1 (the default).
"""
import importlib.util
import os
import sys
import time
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402
from ppfuse.deploy.quantize import OPENVINO_INT8_HELP  # noqa: E402

DEFAULT_CONFIG = "configs/shapes/ppyoloe_plus_crn_s_shapes.yml"
# model.onnx (for ONNX Runtime and OpenVINO) is written and checked with the [onnx] extra
ONNX_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("paddle2onnx", "onnxruntime"))


def log(message):
    print(message, flush=True)


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"PaddleDetection YAML config "
                        f"(default {DEFAULT_CONFIG})")
    parser.add_argument("-o", "--opt", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the config's "
                        "'epoch'); the LR cosine and ATSS->TAL switch scale with it")
    parser.add_argument("--train_images", type=int, default=300, help="generated training images")
    parser.add_argument("--val_images", type=int, default=100, help="generated validation images")
    parser.add_argument("--output_dir", default=None, help="checkpoints, export, evaluation files, "
                        "accuracy.md (default: the config's save_dir)")
    parser.add_argument("--weights", default=None, help="evaluate this training checkpoint; skip training")
    parser.add_argument("--seed", type=int, default=0, help="seed of training (shuffling, augmentation, init)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="CPU threads of training, dygraph "
                        "evaluation and Paddle Inference")
    parser.add_argument("--onednn", choices=["on", "off"], default="on", help="oneDNN in Paddle Inference")
    parser.add_argument("--delete_pass", action="append", default=[], metavar="NAME",
                        help="delete this Paddle Inference pass (repeatable); default: keep every pass")
    parser.add_argument("--runtimes", nargs="+", default=["paddle", "onnxruntime", "openvino"],
                        help="runtimes to score the export in (default: all three)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="CPU precisions: fp32, bf16, int8 "
                        "(default fp32 bf16)")
    parser.add_argument("--activation_type", default="uint8", help="int8: uint8 (default) or int8 activations")
    parser.add_argument("--symmetric_activations", action="store_true", help="int8: activation ranges symmetric "
                        "around 0 (with --activation_type int8: zero point 0; NNCF: its PERFORMANCE preset)")
    parser.add_argument("--openvino_int8", default="nncf", help="int8: " + OPENVINO_INT8_HELP)
    parser.add_argument("--per_tensor", action="store_true", help="int8: one weight scale per conv kernel "
                        "instead of one per output channel (where re-parameterized convs suffer most)")
    parser.add_argument("--calibration_images", type=int, default=32, help="int8: calibration images, the first of "
                        "the training split (default 32)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a checkpoint of the same "
                        "settings is in <output_dir>/train/")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    from ppfuse import runtime
    from ppfuse.errors import ConfigError
    from ppfuse.measure import evaluation
    from ppfuse.ppdet import detection, export
    if args.weights and args.epochs is not None:
        raise ConfigError("--weights skips training, so --epochs has no effect; give one of them")
    cells = []  # (runtime, precision) to score, each checked before the long training
    for name in args.runtimes:
        runtime.runtime_class(name)  # an unknown name is an error now, not after training
        for precision in args.precisions:
            if precision not in runtime.CPU_PRECISIONS[name]:
                log(f"skipped: {name} {precision} ({name} runs {', '.join(runtime.CPU_PRECISIONS[name])} on CPU)")
            elif name == "paddle" and precision == "bf16" and args.onednn == "off":
                log("skipped: paddle bf16: it runs through oneDNN (--onednn off)")
            elif precision == "bf16" and not runtime.bf16_supported():
                log(f"skipped: {name} bf16: this CPU ({runtime.cpu_model()}) has no bf16 instructions")
            elif precision == "int8" and importlib.util.find_spec("ml_dtypes") is None:
                log(f"skipped: {name} int8: needs the [int8] extra")
            elif name != "paddle" and not (ONNX_EXTRA and runtime.available(name)):
                log(f"skipped: {name} {precision}: needs the [onnx] extra (model.onnx)"
                    + (" and the [openvino] extra" if name == "openvino" else ""))
            else:
                cells.append((name, precision))
    evaluation.set_cpu_threads(args.cpu_threads)
    config = detection.load_config(args.config, args.opt)
    if config.get("metric") != "COCO":
        raise ConfigError(f"{args.config}: metric is {config.get('metric')!r}; accuracy parity measures COCO "
                          "bbox mAP (metric: COCO)")
    output_dir = args.output_dir or config.get("save_dir") or "output/shapes"
    evaluation.ensure_shapes_dataset(config, args.train_images, args.val_images, log=log)

    if args.weights:
        weights, trained = args.weights, None
        log(f"training skipped: evaluating {weights}")
    else:
        trained = evaluation.train_once(config, output_dir, args.epochs, args.seed,
                                        {"train_images": args.train_images}, args.retrain, log=log)
        weights = trained.weights
        log(f"trained {trained.epochs} epochs in {trained.seconds / 60:.1f} min -> {weights}")

    eval_dir = os.path.join(output_dir, "eval")
    training_form = evaluation.evaluate_training_form(config, weights, os.path.join(eval_dir, "training"), log=log)
    start = time.perf_counter()
    onnx = any(name != "paddle" for name, _ in cells)
    exported = export.export(config, os.path.join(output_dir, "inference"), weights=weights, onnx=onnx, log=log)
    log(f"exported to {exported.directory}/ in {time.perf_counter() - start:.1f} s")
    if any(precision == "int8" for _, precision in cells):
        from ppfuse.deploy import quantize
        calibration = evaluation.dataset_split(config, "TrainDataset").images
        settings = quantize.QuantizeSettings(images=args.calibration_images, per_channel=not args.per_tensor,
                                             activation_type=args.activation_type,
                                             symmetric_activations=args.symmetric_activations,
                                             openvino=args.openvino_int8)
        quantized = quantize.quantize_export(exported.directory, calibration, settings, log=log)
        log(quantized.line())
    scores = [training_form]
    for name, precision in cells:
        options = runtime.RuntimeOptions(cpu_threads=args.cpu_threads, onednn=args.onednn == "on", precision=precision,
                                         delete_passes=args.delete_pass if name == "paddle" else ())
        scores.append(evaluation.evaluate_exported(
            exported.directory, evaluation.dataset_split(config, "EvalDataset"),
            os.path.join(eval_dir, f"export_{name}_{precision}"), options, log=log, runtime=name))

    command = " ".join(["python tools/accuracy_parity.py"] + list(argv))
    notes = [f"config: `{args.config}`, weights: `{weights}`, {training_form.images} val images",
             f"CPU: {runtime.cpu_description()}"]
    notes += [f"{r.form}: {r.settings}" for r in scores[1:]]
    costs = evaluation.bf16_costs(scores)
    notes += costs + [f"command: `{command}`"]
    if trained is not None:
        notes.append(f"training: {trained.epochs} epochs, {args.train_images} images, "
                     f"{trained.seconds / 60:.1f} min on {args.cpu_threads} CPU thread(s)")
    record = {"config": args.config, "weights": weights, "command": command,
              "train_seconds": trained.seconds if trained else None,
              "schedule": {k: str(v) for k, v in trained.schedule.items()} if trained else None}
    path = evaluation.write_report(output_dir, scores, notes, record)
    print("\n" + evaluation.parity_table(scores) + "\n\n" + "".join(f"- {n}\n" for n in costs) + f"\nwrote {path}")
    result = results.write("accuracy", "Accuracy parity", evaluation.report_markdown(scores, notes),
                           dict(record, results=[r.to_dict() for r in scores]), results_dir,
                           results.command_line(__file__, argv), files=[path])
    if result:
        print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
