"""trtllm: a PyTorch-frontend tracing compiler for LLM inference.

Each top-level folder is a subpackage of the one import name `trtllm` (DESIGN.md §2).
"""

from setuptools import setup

PACKAGE_DIRS = {
    "trtllm": "trtllm",
    "trtllm.frontend": "frontend",
    "trtllm.frontend.tracer": "frontend/tracer",
    "trtllm.frontend.serve": "frontend/serve",
    "trtllm.fusion": "fusion",
    "trtllm.lowering": "lowering",
    "trtllm.kernels": "kernels",
    "trtllm.runtime": "runtime",
    "trtllm.plugins_cpp": "plugins_cpp",  # its CUDA sources compile at first use (plugins_cpp/__init__.py)
}

# torch.onnx's exporter needs onnxscript; onnx-graphsurgeon writes the plugin nodes; onnxruntime
# runs the standard-ops file.
ONNX = ["onnx>=1.16", "onnxscript>=0.5", "onnx-graphsurgeon>=0.5", "onnxruntime>=1.18"]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20"]
_X86_LINUX = "sys_platform == 'linux' and platform_machine == 'x86_64'"
TRITON_SERVER = [f"nvidia-pytriton>=0.5; {_X86_LINUX}", f"tritonclient[grpc]>=2.50; {_X86_LINUX}"]

setup(
    name="trtllm",
    version="0.1.0",
    description="Trace, fuse and lower PyTorch LLMs into fast inference engines",
    python_requires=">=3.11",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"trtllm.plugins_cpp": ["csrc/*.cu", "csrc/*.h", "csrc/*.cuh", "tensorrt/*.cu"]},
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17,<6",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        # The CUDA kernels; on CPU, tests run them through Triton's interpreter.
        "triton>=3.4; sys_platform == 'linux'",
    ],
    extras_require={
        # Tests on CPU run the kernels in Triton's interpreter, which needs 3.8 with numpy 2.4.
        # accelerate: transformers loads FP8 checkpoints through it (tests/frontend/test_fp8_checkpoint.py)
        "test": ["pytest>=8", "pytest-timeout", "triton==3.8.0; sys_platform == 'linux'", "matplotlib", "accelerate",
                 *ONNX, *SERVE, *TRITON_SERVER, "openai>=1.40", "httpx>=0.27"],
        # `trtllm bench --plot`, `benchmarks/kernel_bench.py --plot`, `benchmarks/serve_bench.py`
        "bench": ["matplotlib", *SERVE, "httpx>=0.27"],
        # trtllm.export_onnx (and the tensorrt backend, whose TensorRT itself is installed apart)
        "onnx": ONNX,
        # `trtllm serve`: the OpenAI-compatible HTTP server
        "serve": SERVE,
        # `trtllm.frontend.serve.triton`: Triton Inference Server through PyTriton (it bundles
        # tritonserver, x86-64 Linux only, and needs numpy < 2)
        "tritonserver": [*SERVE, *TRITON_SERVER],
    },
    entry_points={
        "console_scripts": ["trtllm=trtllm.frontend.cli:main"],
        # torch.compile(m, backend="trtllm") finds the backend here, without `import trtllm`.
        "torch_dynamo_backends": ["trtllm = trtllm.frontend.backend:trtllm_backend"],
    },
)
