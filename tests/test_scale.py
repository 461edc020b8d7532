"""Batch detection (Ray Data) and serving (Ray Serve) on one local Ray cluster started for this module.

What is checked, on PP-YOLOE+ s 320 with random weights (score threshold 0.3, so nearly every image has detections):

* a batch job gives exactly one record per input, in input order by id: the detections tools/infer.py
  writes for the same image (same count and classes, scores within 1e-5, boxes within 1e-3 px), or one error
  line with the image's path (a corrupt file, a missing one);
* a detection actor killed mid-job (SIGKILL) is restarted by Ray and the job still writes every record once;
  a record no worker returns gets a second pass, then an error record; a record that comes twice is written once;
* the server answers tools/infer.py's detections, refuses bad requests with a 4xx and one line and goes on
  answering, batches concurrent requests, and listens on 127.0.0.1 only;
* options the cluster cannot run (a GPU, more CPUs than it has, a port in use) are one line, exit code 2,
  nothing written.

Needs the scale extra (ray); skipped without it.
"""
import ast
import json
import os
import signal
import socket
import threading

import numpy as np
import pytest

from conftest import ROOT
from test_errors import INFER, expect_error, load_tool, run_tool

ray = pytest.importorskip("ray", reason="needs the scale extra (ray[data,serve])")

from ppfuse.runtime import RuntimeOptions  # noqa: E402
from ppfuse.scale import batch, cluster  # noqa: E402
from ppfuse.scale.worker import WorkerSpec  # noqa: E402

pytestmark = pytest.mark.ppdet  # the export is made with PaddleDetection's config

CONFIG = os.path.join(ROOT, "configs", "ppyoloe", "ppyoloe_plus_crn_s_320_test.yml")
THRESHOLD = 0.3
BOX_TOLERANCE = 1e-3  # px; batched and single runs gave identical numbers here, this allows oneDNN's reorderings
SCORE_TOLERANCE = 1e-5
BATCH = load_tool("batch_infer")
SERVE = load_tool("serve")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with cluster.connect() as info:  # reuses the cluster above
            yield info
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The export, six generated images (plus a corrupt one and a missing one in the list), and the detections
    tools/infer.py's code gives for each valid image."""
    import cv2

    from ppfuse.deploy import inference
    from ppfuse.measure.shapes import write_split
    from ppfuse.ppdet import detection, export
    tmp = tmp_path_factory.mktemp("scale")
    model_dir = export.export(detection.load_config(CONFIG), str(tmp / "export"), log=lambda *_: None).directory
    write_split(str(tmp / "shapes"), "val", 6, seed=3, size=320)
    valid = sorted(str(p) for p in (tmp / "shapes" / "val").iterdir())
    # one image of another size, so that clipping and scale factors differ between images
    wide = str(tmp / "shapes" / "val" / "wide.png")
    cv2.imwrite(wide, cv2.resize(cv2.imread(valid[0]), (480, 256)))
    valid.append(wide)
    corrupt = str(tmp / "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(range(256)))
    missing = str(tmp / "missing.jpg")
    detector = inference.Detector(model_dir, RuntimeOptions(cpu_threads=1))
    reference = {}
    for path in valid:
        image = inference.read_image(path)
        reference[path] = detector.predict(image).above(THRESHOLD).clipped(*image.shape[:2]).to_list()
    assert sum(1 for found in reference.values() if found) >= len(valid) - 1, "too few detections to compare"
    return {"model_dir": model_dir, "valid": valid, "corrupt": corrupt, "missing": missing, "tmp": tmp,
            "reference": reference}


def write_list(path, lines):
    with open(path, "w") as f:
        f.write("# images\n" + "\n".join(lines) + "\n")
    return str(path)


def assert_same_detections(got, want, where):
    """``got`` as batch annotations (bbox x, y, w, h; category_id = class + 1) or serve/infer dicts."""
    assert len(got) == len(want), (where, len(got), len(want))
    for g, w in zip(got, want):
        if "bbox" in g:
            x, y, width, height = g["bbox"]
            g = {"class_id": g["category_id"] - 1, "label": g["label"], "score": g["score"],
                 "box": [x, y, x + width, y + height]}
        assert (g["class_id"], g["label"]) == (w["class_id"], w["label"]), where
        np.testing.assert_allclose(g["score"], w["score"], atol=SCORE_TOLERANCE, rtol=0, err_msg=where)
        np.testing.assert_allclose(g["box"], w["box"], atol=BOX_TOLERANCE, rtol=0, err_msg=where)


# --- batch detection --------------------------------------------------------------------------------------------


def test_batch_job_equals_infer_record_for_record(data, ray_cluster, capsys):
    tmp = data["tmp"]
    paths = data["valid"][:3] + [data["corrupt"]] + data["valid"][3:] + [data["missing"]]
    image_list = write_list(tmp / "list.txt", [os.path.relpath(p, tmp) for p in paths])
    out = str(tmp / "batch_out")
    code, stdout, err = run_tool(BATCH, ["--model_dir", data["model_dir"], "--image_list", image_list,
                                         "--output_dir", out, "--threshold", str(THRESHOLD), "--workers", "2",
                                         "--batch_size", "3"], capsys)
    assert code == 0, err
    assert f"{len(paths)} records for {len(paths)} images" in stdout and "2 errors" in stdout, stdout
    assert sorted(os.listdir(out)) == ["detections.json", "summary.json"]  # nothing staged left behind

    infer_out = str(tmp / "infer_out")
    code, _, err = run_tool(INFER, ["--model_dir", data["model_dir"], "--image_dir", os.path.dirname(paths[0]),
                                    "--threshold", str(THRESHOLD), "--output_dir", infer_out], capsys)
    assert code == 0, err

    records = batch.read_records(out)
    assert sorted(records) == list(range(1, len(paths) + 1))
    for image_id, path in enumerate(paths, 1):
        record = records[image_id]
        assert record["file_name"] == path
        if path == data["corrupt"]:
            assert record["error"] == f"{path}: not an image OpenCV can read" and not record["annotations"]
        elif path == data["missing"]:
            assert record["error"] == f"{path}: image not found" and not record["annotations"]
        else:
            assert "error" not in record and record["detections"] == len(record["annotations"])
            with open(os.path.join(infer_out, os.path.splitext(os.path.basename(path))[0] + ".json")) as f:
                want = json.load(f)["detections"]
            assert_same_detections(record["annotations"], want, path)
            assert_same_detections(record["annotations"], data["reference"][path], path)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert (summary["inputs"], summary["records"], summary["errors"], summary["duplicates_dropped"]) == \
        (len(paths), len(paths), 2, 0)
    assert summary["ran"]["workers"] == 2 and summary["ran"]["runtime"] == "paddle"
    assert any("fp32 requested, fp32 ran" in ran for ran in summary["ran"]["workers_seen"].values())


def test_an_actor_killed_mid_job_still_gives_every_record_once(data, ray_cluster):
    paths = [data["valid"][i % len(data["valid"])] for i in range(15)] + [data["corrupt"]]
    killed = []

    def kill_one(progress):
        if progress.done >= 2 and not killed:
            victim = sorted(progress.workers)[0]
            host, pid = victim.rsplit(":", 1)
            assert host == socket.gethostname()
            os.kill(int(pid), signal.SIGKILL)  # one of this test's own actors, by its pid
            killed.append((victim, progress.done))

    job = batch.BatchJob(WorkerSpec(data["model_dir"], options=RuntimeOptions(cpu_threads=1), threshold=THRESHOLD),
                         workers=2, batch_size=1)
    out = str(data["tmp"] / "killed_out")
    summary = batch.run(job, paths, out, ray_cluster, progress=kill_one)
    assert killed and killed[0][1] < len(paths), "the actor was not killed while the job ran"
    records = batch.read_records(out)
    assert sorted(records) == list(range(1, len(paths) + 1)) and summary["records"] == len(paths)
    for image_id, path in enumerate(paths, 1):
        if path == data["corrupt"]:
            assert "error" in records[image_id]
        else:
            assert_same_detections(records[image_id]["annotations"], data["reference"][path], path)
    assert killed[0][0] in summary["ran"]["workers_seen"]
    assert len(summary["ran"]["workers_seen"]) >= 3, summary["ran"]["workers_seen"]  # two, and the restarted one


def test_the_writer_keeps_one_record_per_id_and_shards_in_order(tmp_path):
    writer = batch.RecordWriter(str(tmp_path), 5, 2, ["a", "b"])
    record = {"path": "x.jpg", "height": 10, "width": 20, "error": "",
              "detections": [{"class_id": 1, "label": "b", "score": 0.9, "box": [1.0, 2.0, 4.0, 6.0]}]}
    for image_id in (5, 2, 1, 2, 4, 3, 5):
        writer.add(dict(record, image_id=image_id))
    assert (writer.written, writer.duplicates, writer.missing()) == (5, 2, [])
    out = tmp_path / "out"
    out.mkdir()
    files = writer.finish(str(out))
    assert [os.path.basename(f) for f in files] == [f"detections-0000{i}-of-00003.json" for i in range(3)]
    first = json.load(open(files[0]))
    assert [image["id"] for image in first["images"]] == [1, 2]
    assert first["annotations"][0]["bbox"] == [1.0, 2.0, 3.0, 4.0] and first["annotations"][0]["category_id"] == 2
    with pytest.raises(Exception, match="image id 6 of 5 inputs"):
        writer.add(dict(record, image_id=6))


def test_a_record_no_worker_returns_gets_a_second_pass_then_an_error_record(data, tmp_path, monkeypatch):
    """Without Ray: the stream is replaced by one that never returns image 2 and returns image 3 twice."""
    calls = []

    def stream(items, job, workers, preprocess):
        calls.append([item["image_id"] for item in items])
        for item in items:
            if item["image_id"] == 2:
                continue
            for _ in range(2 if item["image_id"] == 3 else 1):
                yield {"image_id": item["image_id"], "path": item["path"], "height": 1, "width": 1, "error": "",
                       "detections": [], "worker": "here:1", "ran": ""}

    monkeypatch.setattr(batch, "_stream", stream)
    paths = data["valid"][:4]
    job = batch.BatchJob(WorkerSpec(data["model_dir"], options=RuntimeOptions(cpu_threads=1)), workers=1)
    summary = batch.run(job, paths, str(tmp_path / "out"), cluster.ClusterInfo("fake", 2, 0, "test"))
    assert calls == [[1, 2, 3, 4], [2]]
    assert (summary["records"], summary["duplicates_dropped"], summary["lost_after_two_passes"]) == (4, 1, 1)
    records = batch.read_records(str(tmp_path / "out"))
    assert records[2]["error"] == f"{paths[1]}: no worker returned a result in two passes"


def test_what_the_cluster_cannot_run_is_one_line_and_writes_nothing(data, ray_cluster, capsys):
    out = str(data["tmp"] / "refused")
    common = ["--model_dir", data["model_dir"], "--image_dir", os.path.dirname(data["valid"][0]), "--output_dir", out]
    expect_error(BATCH, common + ["--device", "gpu"], capsys,
                 r"^error: --device gpu: the Ray cluster has no GPU .*use --device cpu", out)
    expect_error(BATCH, common + ["--workers", "3"], capsys,
                 r"^error: 3 workers x 1 CPU \(--cpu_threads\) need 3 CPUs; Ray .* 2 CPU", out)
    expect_error(BATCH, common + ["--runtime", "onnxruntime", "--precision", "int8"], capsys,
                 r"^error: .*: no model(_int8)?\.onnx", out)
    expect_error(SERVE, ["--model_dir", data["model_dir"], "--device", "gpu"], capsys,
                 r"^error: --device gpu: the Ray cluster has no GPU")


# --- serving ----------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port):
    """The local addresses of every listening TCP socket on ``port`` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


@pytest.fixture(scope="module")
def service(data, ray_cluster):
    from ppfuse.scale import serve
    options = serve.ServeOptions(WorkerSpec(data["model_dir"], options=RuntimeOptions(cpu_threads=1),
                                            threshold=THRESHOLD), replicas=1, max_batch_size=4,
                                 batch_wait_timeout_s=0.05, port=free_port(), max_body_bytes=2 * 2 ** 20,
                                 max_pixels=1_000_000)
    url = serve.start(options, ray_cluster)
    try:
        yield url, options
    finally:
        serve.stop()


def test_the_server_answers_infer_detections_and_listens_on_loopback_only(data, service):
    from ppfuse.scale.client import DetectClient
    url, options = service
    assert listening_addresses(options.port) == ["0100007F"]  # 127.0.0.1, and nothing else
    with DetectClient(url) as client:
        health = client.health()
        assert health["status"] == "ok" and "fp32 requested, fp32 ran" in health["ran"]
        for path in data["valid"][:2] + data["valid"][-1:]:
            result = client.detect(path)
            assert_same_detections(result["detections"], data["reference"][path], path)
        import cv2
        as_array = client.detect(cv2.imread(data["valid"][0]))  # sent as PNG: decodes to the same pixels
        assert_same_detections(as_array["detections"], data["reference"][data["valid"][0]], "array")
        assert client.detect(data["valid"][0], threshold=0.99)["threshold"] == 0.99


def _post(url, body, content_type, path="/detect", method="POST"):
    import http.client
    import urllib.parse
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_the_server_refuses_bad_requests_with_one_line_and_keeps_answering(data, service):
    import cv2

    from ppfuse.scale.client import DetectClient, RequestError
    url, options = service
    jpeg = open(data["valid"][0], "rb").read()
    boundary = "ppfuse-test-boundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + jpeg + f"\r\n--{boundary}--\r\n".encode()
    status, text = _post(url, form, f"multipart/form-data; boundary={boundary}")
    assert status == 200, text
    assert_same_detections(json.loads(text)["detections"], data["reference"][data["valid"][0]], "multipart")

    too_many_pixels = cv2.imencode(".png", np.zeros((1000, 1200, 3), np.uint8))[1].tobytes()  # 1.2 Mpx, small file
    bad = [
        (b"", "image/jpeg", 400, r"^empty body"),
        (b"hello", "text/plain", 415, r"^Content-Type text/plain: send the image as the body"),
        (json.dumps({"image": "x"}).encode(), "application/json", 415, r"^Content-Type application/json"),
        (open(data["corrupt"], "rb").read(), "image/jpeg", 400, r"^not an image OpenCV can decode"),
        (too_many_pixels, "image/png", 413, r"^image of 1200 x 1000 pixels: the limit is 1000000 pixels"),
        (b"\0" * (3 * 2 ** 20), "image/jpeg", 413, r"^body of 3145728 bytes: the limit is 2097152 bytes"),
        (form.replace(b'name="image"; filename="a.jpg"', b'name="other"'), f"multipart/form-data; boundary={boundary}",
         400, r"field named 'image'"),
    ]
    import re
    for body, content_type, status, pattern in bad:
        got, text = _post(url, body, content_type)
        assert got == status, (content_type, got, text)
        assert "\n" not in text.strip() and re.search(pattern, json.loads(text)["error"]), text
        assert _post(url, jpeg, "image/jpeg")[0] == 200  # and the service goes on
    assert _post(url, None, None, method="GET")[0] == 405
    assert _post(url, None, None, path="/nope", method="GET")[0] == 404
    with DetectClient(url, retries=2) as client:  # a 4xx is the request's fault: never retried
        with pytest.raises(RequestError, match=r"415 Content-Type text/plain") as refused:
            client.detect(b"hello", content_type="text/plain")
        assert refused.value.status == 415 and client.retried == 0
        assert client.health()["status"] == "ok"


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(data, service):
    from ppfuse.scale.client import DetectClient
    url, _ = service
    results, failures = [], []

    def client_thread(index):
        with DetectClient(url) as client:
            for k in range(2):
                path = data["valid"][(index + k) % len(data["valid"])]
                try:
                    results.append((path, client.detect(path)))
                except Exception as exc:  # noqa: BLE001
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == [] and len(results) == 16
    for path, result in results:
        assert_same_detections(result["detections"], data["reference"][path], path)
    assert max(result["batch_size"] for _, result in results) > 1  # dynamic batching ran


def test_serve_refuses_a_port_in_use_in_one_line(data, ray_cluster, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        expect_error(SERVE, ["--model_dir", data["model_dir"], "--port", str(port)], capsys,
                     rf"^error: --port {port}: 127\.0\.0\.1:{port} is not free")


@pytest.mark.slow
def test_a_killed_replica_is_replaced_and_clients_with_retries_lose_nothing(data, ray_cluster):
    from ppfuse.scale import serve
    from ppfuse.scale.client import DetectClient
    options = serve.ServeOptions(WorkerSpec(data["model_dir"], options=RuntimeOptions(cpu_threads=1),
                                            threshold=THRESHOLD), replicas=2, max_batch_size=4, port=free_port())
    url = serve.start(options, ray_cluster)
    try:
        with DetectClient(url) as probe:
            victim = probe.health()["worker"]
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        answers, failures = [], []

        def client_thread():
            with DetectClient(url, retries=5, backoff_s=0.5) as client:
                for k in range(6):
                    try:
                        answers.append(client.detect(data["valid"][k % len(data["valid"])]))
                    except Exception as exc:  # noqa: BLE001
                        failures.append(repr(exc))

        threads = [threading.Thread(target=client_thread) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert failures == [] and len(answers) == 24
        import time
        deadline = time.monotonic() + 120
        workers = set()
        while time.monotonic() < deadline and (len(workers) < 2 or victim in workers):
            with DetectClient(url) as probe:
                workers.add(probe.health()["worker"])
            workers.discard(victim)
            time.sleep(0.2)
        assert len(workers - {victim}) == 2, workers  # two replicas again, one of them new
    finally:
        serve.stop()


# --- the layer ----------------------------------------------------------------------------------------------------


def test_scale_imports_only_deploy_runtime_and_the_facts():
    allowed = ("ppfuse.deploy", "ppfuse.runtime", "ppfuse.export_format", "ppfuse.errors", "ppfuse.scale")
    folder = os.path.join(ROOT, "ppfuse", "scale")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module.startswith("ppfuse") or module.startswith("ppdet"):
                    assert module.startswith(allowed), f"ppfuse/scale/{name}:{node.lineno} imports {module}"

