"""latfarm measurement agent: leases jobs from the server, times ONNX models, posts results.

The agent depends on httpx, pydantic, onnxruntime, numpy and the standard library only.
"""

__version__ = "0.1.0"
