"""Measure batch detection and serving on Ray against a plain loop, with one worker killed in each.

    python tools/scale_benchmark.py --model_dir output_inference/ppyoloe_plus_crn_s_320_test \
        [--runtime paddle|onnxruntime|openvino] [--precision fp32|bf16|int8] [--images 1000] [--image_size 320] \
        [--workers 2] [--cpu_threads 1] [--batch_size 8] [--replicas 2] [--max_batch_size 8] \
        [--clients 1 4 16] [--requests 64] [--port 8000] [--results_dir results]

On generated shapes images: tools/infer.py's Detector in a plain loop (the reference detections and the
baseline), the same images as a Ray Data batch job (images/s, records equal to the loop's, exactly one per
image), the batch job again with one actor killed, the detection service at 1, 4 and 16 concurrent clients
with and without dynamic batching (latency p50/p99, requests/s, lost requests, answers equal to the loop's),
and a load run in which one replica is killed (what the clients saw, when a new replica answered). A local
Ray cluster runs inside this process; every request goes to 127.0.0.1; every run is bounded in count and
time. Writes the dated result <results_dir>/scale/<date>_<cpu>.md and .json. Needs the scale extra.
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
    parser.add_argument("--model_dir", required=True, help="directory written by tools/export_deploy.py")
    parser.add_argument("--runtime", default="paddle", help="paddle (default), onnxruntime or openvino")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or int8 (as the runtime allows)")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold (infer_cfg.yml's)")
    parser.add_argument("--images", type=int, default=1000, help="generated images (default 1000)")
    parser.add_argument("--image_size", type=int, default=320)
    parser.add_argument("--fault_images", type=int, default=200, help="images of the batch run with a killed actor")
    parser.add_argument("--loop_threads", type=int, default=2, help="the plain loop's runtime threads (default 2, "
                        "tools/infer.py's)")
    parser.add_argument("--workers", type=int, default=2, help="batch actors (default 2)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="threads per actor and per replica (default 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max_batch_size", type=int, default=8, help="dynamic batching's largest batch (the "
                        "runs without it use 1)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=64, help="requests per serving level (default 64)")
    parser.add_argument("--level_timeout", type=float, default=60.0, help="seconds at most per serving level")
    parser.add_argument("--fault_requests", type=int, default=120, help="requests of the run with a killed replica")
    parser.add_argument("--port", type=int, default=8000, help="the service's port on 127.0.0.1")
    parser.add_argument("--workdir", default=None, help="images and batch outputs (default: a temporary folder, "
                        "removed at the end)")
    from ppfuse.measure import results
    results.add_arguments(parser)
    args = parser.parse_args(argv)
    results_dir = results.directory(args)

    from ppfuse.errors import InferenceError
    from ppfuse.scale import cluster
    cluster.require_ray("tools/scale_benchmark.py")
    from ppfuse.measure import scale
    if max(args.clients) > 64 or min(args.clients) < 1 or args.requests < 1 or args.requests > 10_000:
        raise InferenceError("--clients from 1 to 64 and --requests from 1 to 10000: the runs stay bounded")
    settings = scale.ScaleSettings(
        args.model_dir, args.runtime, args.precision, args.threshold, args.images, args.image_size,
        args.loop_threads, args.workers, args.cpu_threads, args.batch_size, args.fault_images, args.replicas,
        args.max_batch_size, clients=tuple(args.clients), requests=args.requests,
        level_timeout_s=args.level_timeout, fault_requests=args.fault_requests, port=args.port)
    with contextlib_workdir(args.workdir) as workdir:
        with cluster.connect(quiet=not args.debug, needed_for="tools/scale_benchmark.py") as ray_cluster:
            print(ray_cluster.line(), flush=True)
            body, data = scale.run(settings, workdir, ray_cluster, log=lambda line: print(line, flush=True))
    import ray
    data["ray"] = ray.__version__
    print(body)
    path = results.write("scale", "Batch detection and serving on Ray", body, data, results_dir,
                         results.command_line(__file__, argv))
    if path:
        print(f"wrote {path}")
    return 0


def contextlib_workdir(path):
    """``path`` (created), or a temporary folder removed at the end."""
    import contextlib
    if path:
        os.makedirs(path, exist_ok=True)
        return contextlib.nullcontext(path)
    return tempfile.TemporaryDirectory(prefix="scale_benchmark-")


if __name__ == "__main__":
    sys.exit(cli.main(run))
