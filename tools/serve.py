"""Serve an exported detector over HTTP on 127.0.0.1 with Ray Serve, batching concurrent requests.

    python tools/serve.py --model_dir output_inference/ppyoloe_plus_crn_s_80e_coco \
        [--runtime paddle|onnxruntime|openvino] [--precision fp32|bf16|int8|fp16] [--device cpu|gpu] \
        [--replicas 1] [--cpu_threads 1] [--max_batch_size 8] [--batch_wait_ms 10] [--threshold 0.5] \
        [--port 8000] [--duration 0] [--address auto]

    curl -s -X POST --data-binary @photo.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/detect

POST /detect takes an image as the body (or the 'image' field of a multipart form) and answers tools/infer.py's
detections as JSON; GET /health says what each replica runs. Each replica loads the export once; up to
--max_batch_size concurrent requests run as one runtime call (1: no dynamic batching). A bad request gets a
4xx with one line and the service goes on. Listens on 127.0.0.1 only; Ctrl-C (or --duration seconds) stops
it. Needs the scale extra; docs/scale.md.
"""
import logging
import os
import signal
import sys
import time
import warnings

if "--debug" not in sys.argv:  # Paddle's import warns that ccache is missing; nothing here compiles C++
    warnings.filterwarnings("ignore", message="No ccache found")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ppfuse import cli  # noqa: E402


class _Stop(Exception):
    """SIGTERM: stop as Ctrl-C does."""


def _on_sigterm(*_):
    raise _Stop()


def run(argv):
    parser = cli.base_parser(__doc__.splitlines()[0], config=False)
    parser.add_argument("--model_dir", required=True, help="directory written by tools/export_deploy.py")
    parser.add_argument("--runtime", default="paddle", help="paddle (default), onnxruntime or openvino")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 (CPU: paddle, openvino), int8 (CPU: "
                        "onnxruntime, openvino) or fp16 (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, or gpu: one GPU per replica")
    parser.add_argument("--replicas", type=int, default=1, help="replicas, each loading the export once (default 1)")
    parser.add_argument("--cpu_threads", type=int, default=1, help="runtime threads per replica (the CPUs each "
                        "asks Ray for; default 1)")
    parser.add_argument("--max_batch_size", type=int, default=8, help="most requests run as one batch (default 8; "
                        "1: no dynamic batching)")
    parser.add_argument("--batch_wait_ms", type=float, default=10.0, help="how long a batch waits to fill "
                        "(default 10 ms)")
    parser.add_argument("--threshold", type=float, default=None, help="default score threshold (infer_cfg.yml's "
                        "draw_threshold); a request may give ?threshold=")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    parser.add_argument("--max_body_mb", type=float, default=None, help="largest request body in MiB (default 20)")
    parser.add_argument("--max_pixels", type=int, default=None, help="largest image, width x height (default "
                        "40000000)")
    parser.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default 0: "
                        "until Ctrl-C)")
    parser.add_argument("--address", default=None, help="join a running Ray cluster: auto, HOST:6379 or "
                        "ray://HOST:10001 (default: start a local one in this process)")
    args = parser.parse_args(argv)

    from ppfuse.runtime import RuntimeOptions
    from ppfuse.scale import cluster
    cluster.require_ray("tools/serve.py")
    from ppfuse.scale import serve
    from ppfuse.scale.worker import WorkerSpec

    spec = WorkerSpec(args.model_dir, args.runtime, RuntimeOptions(device=args.device, precision=args.precision,
                                                                   cpu_threads=args.cpu_threads), args.threshold)
    options = serve.ServeOptions(spec, args.replicas, args.max_batch_size, args.batch_wait_ms / 1000, args.port)
    if args.max_body_mb is not None:
        options.max_body_bytes = int(args.max_body_mb * 2 ** 20)
    if args.max_pixels is not None:
        options.max_pixels = args.max_pixels
    options.validate()
    if args.duration < 0:
        from ppfuse.errors import InferenceError
        raise InferenceError(f"--duration {args.duration:g}: use 0 (until Ctrl-C) or more seconds")
    if not args.debug:  # Serve logs a failed replica's traceback; the error comes as one line
        logging.getLogger("ray.serve").setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with cluster.connect(args.address, quiet=not args.debug, needed_for="tools/serve.py") as ray_cluster:
            print(f"{ray_cluster.line()}; starting {args.replicas} replica(s) (each loads the export once)",
                  flush=True)
            url = serve.start(options, ray_cluster)
            try:
                print(serve.status_line(url, options), flush=True)
                print(f"try: curl -s -X POST --data-binary @image.jpg -H 'Content-Type: image/jpeg' {url}/detect",
                      flush=True)
                print("Ctrl-C stops" if not args.duration else f"stopping after {args.duration:g} s", flush=True)
                deadline = time.monotonic() + args.duration if args.duration else None
                try:
                    while deadline is None or time.monotonic() < deadline:
                        time.sleep(0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic())))
                except (KeyboardInterrupt, _Stop):
                    pass
            finally:
                serve.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(cli.main(run))
