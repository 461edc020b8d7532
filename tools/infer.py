"""Run an exported detector on an image or a folder of images: Paddle Inference, ONNX Runtime or OpenVINO.

    python tools/infer.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        --image_file demo.jpg [--runtime paddle|onnxruntime|openvino] [--precision fp32|bf16|int8|fp16] \
        [--device cpu|gpu] [--tensorrt] [--cpu_threads 2] [--onednn on|off] [--threshold 0.5] [--output_dir output]

Prints the detections (class, score, box) of each image and writes an annotated
copy and a JSON file per image to --output_dir. Boxes are clipped to the image
and those left empty dropped, as PaddleDetection's post-processing does. An
export of random weights (its ppfuse_report.json says so) gets one warning.
Settings default to the fastest measured ones that give the same detections
(docs/runtimes.md). ONNX Runtime and OpenVINO run the export's model.onnx (export
with --onnx). --precision bf16 (CPU: Paddle Inference's oneDNN, OpenVINO) needs
a CPU with bf16 instructions. --precision int8 (CPU: ONNX Runtime, OpenVINO)
runs model_int8.onnx, written by tools/quantize.py. The precision that ran is
read back and printed (for int8: how many convolutions ran int8).
"""
import json
import os
import sys
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    cli.add_export_and_images(parser)
    parser.add_argument("--runtime", default="paddle", help="paddle (Paddle Inference, default), onnxruntime "
                        "or openvino (both run model.onnx: export with --onnx)")
    parser.add_argument("--device", default="cpu", help="cpu or gpu")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 (CPU: paddle, openvino), int8 (CPU: "
                        "onnxruntime, openvino; run tools/quantize.py first) or fp16 (GPU)")
    parser.add_argument("--tensorrt", action="store_true", help="run through TensorRT (GPU only)")
    parser.add_argument("--cpu_threads", type=int, default=2)
    parser.add_argument("--onednn", choices=["on", "off"], default="on", help="oneDNN on CPU (default on)")
    parser.add_argument("--delete_pass", action="append", default=[], metavar="NAME",
                        help="delete this Paddle Inference pass (repeatable; default: keep every pass)")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold (infer_cfg.yml's)")
    parser.add_argument("--output_dir", default="output", help="annotated images and JSON go here")
    parser.add_argument("--print_max", type=int, default=20, help="detections printed per image (all go to JSON)")
    args = parser.parse_args(argv)

    from ppfuse import runtime
    from ppfuse.deploy import inference
    from ppfuse.errors import InferenceError
    options = runtime.RuntimeOptions(
        device=args.device, precision=args.precision, tensorrt=args.tensorrt, cpu_threads=args.cpu_threads,
        onednn=args.onednn == "on", delete_passes=args.delete_pass)
    images = inference.list_images(args.image_file or args.image_dir)
    images = [inference.read_image(p) for p in images], images
    detector = inference.Detector(args.model_dir, options, runtime=args.runtime)
    if args.precision != "fp32" or args.runtime != "paddle":
        print(f"{detector.runtime.settings()}: "
              f"{detector.runtime.confirm_precision(detector.preprocess(images[0][0])).line()}")
    if detector.random_weights:
        print(f"WARNING: {args.model_dir} was exported with RANDOM weights (no -o weights=...): its detections "
              "are meaningless; export a trained checkpoint to detect anything", file=sys.stderr)
    threshold = detector.draw_threshold if args.threshold is None else args.threshold
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as exc:
        raise InferenceError(f"{args.output_dir}: cannot create the output directory ({exc.strerror})")
    for image, path in zip(*images):
        detections = detector.predict(image).above(threshold).clipped(*image.shape[:2])
        stem = os.path.splitext(os.path.basename(path))[0]
        print(f"{path}: {len(detections.scores)} detections with score >= {threshold}")
        listed = detections.to_list()
        for det in listed[:args.print_max]:
            box = ", ".join(f"{v:.1f}" for v in det["box"])
            print(f"  {det['label']:<16} {det['score']:.3f}  [{box}]")
        if len(listed) > args.print_max:
            print(f"  ... {len(listed) - args.print_max} more in {stem}.json")
        import cv2
        cv2.imwrite(os.path.join(args.output_dir, stem + ".jpg"), inference.draw(image, detections))
        with open(os.path.join(args.output_dir, stem + ".json"), "w") as f:
            json.dump({"image": path, "threshold": threshold, "detections": detections.to_list()}, f, indent=1)
    print(f"wrote annotated images and JSON to {args.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
