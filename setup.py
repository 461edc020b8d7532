"""ppfuse: structural re-parameterization and Conv+BN folding for PaddlePaddle / PaddleDetection.

``pip install .`` installs the core (any ``paddle.nn.Layer``): Paddle 3.x, numpy, PyYAML -- no
PaddleDetection. The PaddleDetection integration is the ``ppdet`` extra plus paddledet itself, which is
installed without its stale pins (numpy<1.24, opencv-python<=4.6, the dead ``sklearn``):

    pip install ".[ppdet]" && pip install --no-deps paddledet==2.6.0

(``scripts/setup_env.sh`` does this for the quick start and CI; docs/install.md explains it.)
"""
from importlib import metadata

from setuptools import find_packages, setup


def _paddle_requirement():
    """``paddlepaddle>=3.0`` unless a GPU build is installed already: pip would put the CPU build's ``paddle``
    package over it. (A GPU build comes from PaddlePaddle's own index, see docs/gpu.md.)"""
    for gpu_build in ("paddlepaddle-gpu", "paddlepaddle_gpu"):
        try:
            metadata.version(gpu_build)
            return []
        except metadata.PackageNotFoundError:
            pass
    return ["paddlepaddle>=3.0"]


ONNX = ["paddle2onnx==2.1.0", "onnx==1.17.0", "onnxruntime", "onnxoptimizer"]
# what paddledet 2.6.0 imports, without its pins (numpy<1.24, opencv-python<=4.6, sklearn==0.0);
# paddledet itself is installed with --no-deps (see above)
PPDET = ["opencv-python", "scipy", "shapely", "pycocotools", "scikit-learn", "lap", "motmetrics", "pyclipper",
         "terminaltables", "typeguard", "tqdm", "Cython", "setuptools", "requests", "six"]

setup(
    name="ppfuse",
    version="0.2.0",
    description="Structural re-parameterization for PaddlePaddle models and PaddleDetection detectors, "
                "exported for Paddle Inference, ONNX Runtime and OpenVINO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppfuse", "ppfuse.*"]),
    python_requires=">=3.8",
    install_requires=["numpy", "pyyaml"] + _paddle_requirement(),
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "ppdet": PPDET,
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
        "onnx": ONNX,
        # OpenVINO runs the export's model.onnx (write it with --onnx, which needs the onnx extra too)
        "openvino": ["openvino==2026.4.1"],
        # int8 (tools/quantize.py): ONNX Runtime's static quantization imports ml_dtypes; NNCF (OpenVINO's
        # quantizer, needs numpy >= 1.24) writes model_int8.xml for OpenVINO
        "int8": ONNX + ["ml_dtypes", "openvino==2026.4.1", "nncf==3.4.0"],
        # batch detection (Ray Data) and serving (Ray Serve): ppfuse.scale, tools/batch_infer.py, tools/serve.py
        "scale": ["ray[data,serve]==2.60.0"],
    },
)
