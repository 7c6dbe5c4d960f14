"""The runtimes the agent times models with: one module per `Runtime`, named like its value
(`agent.runtimes.openvino` for `Runtime.openvino`), each as described in `agent.runtimes.base`.

Adding a runtime: a module here, a `Runtime` member and its `ARTIFACT_FORMATS` entry in
`agent.protocol` (the table the server exports artifacts by).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from agent.protocol import Runtime
from agent.runtimes.base import Backend, LoadSettings, RuntimeUnavailable

__all__ = ["Backend", "LoadSettings", "RuntimeUnavailable", "install_hint", "installed_runtimes", "load_backend"]


def runtime_module(runtime: Runtime) -> ModuleType:
    return importlib.import_module(f"{__name__}.{runtime.value}")


def installed_runtimes() -> dict[str, str]:
    """runtime -> version, for the runtimes installed here."""
    versions = {runtime.value: runtime_module(runtime).installed_version() for runtime in Runtime}
    return {name: version for name, version in versions.items() if version is not None}


def install_hint(runtime: Runtime) -> str:
    return str(runtime_module(runtime).INSTALL)


def load_backend(runtime: Runtime, settings: LoadSettings) -> Backend:
    """The runtime's backend (importing the runtime); raises RuntimeUnavailable when it is not
    installed or cannot run here as asked."""
    module = runtime_module(runtime)
    try:
        backend: Backend = module.Backend(settings)
        return backend
    except ImportError as exc:
        raise RuntimeUnavailable(f"{runtime.value} cannot be imported ({exc}); install {module.INSTALL}") from exc
