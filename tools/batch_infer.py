"""Detect objects in many images on Ray: Ray Data reads and preprocesses, a pool of actors detects.

    python tools/batch_infer.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        --image_dir images/ | --image_list images.txt  --output_dir output/batch \
        [--runtime paddle|onnxruntime|openvino] [--precision fp32|bf16|int8|fp16] [--device cpu|gpu] \
        [--workers N] [--cpu_threads 1] [--batch_size 8] [--threshold 0.5] [--shard_size 10000] [--address auto]

Each actor loads the export once. Preprocessing is infer_cfg.yml's, the code tools/infer.py runs, and so are
the detections (score threshold, boxes clipped to the image). Writes COCO-style detection JSON to
--output_dir (detections.json, or one file per --shard_size images) with exactly one record per input image
-- its detections, or one line saying why not (an unreadable or corrupt image) -- and summary.json (counts,
errors, images/s, what ran where). Without --address, a local Ray cluster runs inside this process; --address
auto joins the one `ray start` started, ray://HOST:10001 a remote one (docs/scale.md). Needs the scale extra.
"""
import logging
import os
import sys
import time
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402

PROGRESS_EVERY_S = 2.0


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--model_dir", required=True, help="directory written by tools/export_deploy.py")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image_dir", help="a folder of images")
    source.add_argument("--image_list", help="a text file, one image path a line (relative to the file's folder)")
    parser.add_argument("--output_dir", required=True, help="detections*.json and summary.json go here")
    parser.add_argument("--runtime", default="paddle", help="paddle (default), onnxruntime or openvino")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 (CPU: paddle, openvino), int8 (CPU: "
                        "onnxruntime, openvino) or fp16 (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, or gpu: one GPU per actor")
    parser.add_argument("--workers", type=int, default=None, help="actors, each loading the export once (default: "
                        "as many as the cluster's CPUs / --cpu_threads, or its GPUs)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="runtime threads per actor (the CPUs each asks "
                        "Ray for; default 1)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per runtime call (default 8)")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold (infer_cfg.yml's "
                        "draw_threshold, as tools/infer.py); 0 keeps every detection, e.g. for mAP")
    parser.add_argument("--shard_size", type=int, default=10_000, help="records per output file (default 10000)")
    parser.add_argument("--address", default=None, help="join a running Ray cluster: auto, HOST:6379 or "
                        "ray://HOST:10001 (default: start a local one in this process)")
    args = parser.parse_args(argv)

    from ppfuse.runtime import RuntimeOptions
    from ppfuse.scale import cluster
    cluster.require_ray("tools/batch_infer.py")
    from ppfuse.scale import batch
    from ppfuse.scale.worker import WorkerSpec

    paths = batch.input_paths(args.image_dir, args.image_list)
    spec = WorkerSpec(args.model_dir, args.runtime, RuntimeOptions(device=args.device, precision=args.precision,
                                                                   cpu_threads=args.cpu_threads), args.threshold)
    job = batch.BatchJob(spec, args.workers, args.batch_size, args.shard_size)
    job.validate()
    from ppfuse.runtime import check_options, runtime_class
    runtime_class(args.runtime)
    check_options(spec.options, args.runtime)
    last = [0.0]

    def show(progress):
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S or progress.done == progress.total:
            last[0] = now
            print(progress.line(), flush=True)

    if not args.debug:  # Ray Data logs a failed actor's traceback; the error comes as one line below
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
    with cluster.connect(args.address, quiet=not args.debug, needed_for="tools/batch_infer.py") as ray_cluster:
        print(f"{ray_cluster.line()}; {len(paths)} images; starting the workers (each loads the export once)",
              flush=True)
        summary = batch.run(job, paths, args.output_dir, ray_cluster, progress=show)
    for worker, ran in sorted(summary["ran"]["workers_seen"].items()):
        print(f"worker {worker}: {ran or '(no image of its own)'}")
    errors = f"{summary['errors']} error{'s' * (summary['errors'] != 1)}"
    print(f"{summary['records']} records for {summary['inputs']} images: {summary['ok']} detected "
          f"({summary['detections']} detections), {errors}; {summary['images_per_s']} images/s "
          f"with {summary['ran']['workers']} workers")
    for example in summary["error_examples"][:5]:
        print(f"  error: image {example['image_id']}: {example['error']}")
    if summary["errors"] > 5:
        print(f"  ... {summary['errors'] - 5} more errors in {os.path.join(args.output_dir, batch.SUMMARY_FILE)} "
              "and the images entries")
    print(f"wrote {', '.join(summary['files'])} and {batch.SUMMARY_FILE} to {args.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
