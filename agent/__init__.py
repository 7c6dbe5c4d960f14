"""latfarm measurement agent: leases jobs from the server, times models with ONNX Runtime (or
PyTorch), posts results.

The agent depends on httpx, pydantic, onnxruntime, numpy and the standard library only; torch is
optional and imported only by the child process that times a PyTorch job.
"""

__version__ = "0.1.0"
