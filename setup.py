"""ppfuse: structural re-parameterization and Conv+BN folding for PaddlePaddle / PaddleDetection."""
from setuptools import find_packages, setup

ONNX = ["paddle2onnx==2.1.0", "onnx==1.17.0", "onnxruntime", "onnxoptimizer"]

setup(
    name="ppfuse",
    version="0.1.0",
    description="Structural re-parameterization for PaddlePaddle detection models (PP-YOLOE), "
                "exported for Paddle Inference",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ppfuse", "ppfuse.*"]),
    python_requires=">=3.8",
    install_requires=[
        # Paddle itself comes from an extra: `cpu` here, or paddlepaddle-gpu installed by the user,
        # so that installing ppfuse never pulls a second Paddle build beside a GPU one.
        "paddledet==2.6.0",
        "numpy<1.24",          # paddledet 2.6.0 pins it; numpy 2 breaks its cv2/ppdet imports
        "scikit-learn<1.4",    # paddledet needs the real one behind its dead `sklearn` dummy
        "pyyaml",
    ],
    extras_require={
        "cpu": ["paddlepaddle==3.3.1"],
        "test": ["pytest", "hypothesis"],
        "bench": ["matplotlib"],
        "onnx": ONNX,
        # OpenVINO runs the export's model.onnx (write it with --onnx, which needs the onnx extra too);
        # 2026.4.1 installs beside numpy 1.23.5 and Paddle 3.3.1 (whose own libopenvino 2025.0 does not clash)
        "openvino": ["openvino==2026.4.1"],
        # int8 (tools/quantize.py): ONNX Runtime's static quantization imports ml_dtypes; its newest releases
        # need numpy 2, 0.3.2 keeps numpy 1.23.5 (constraints.txt pins it)
        "int8": ONNX + ["ml_dtypes==0.3.2"],
    },
)
