"""The web dashboard under /ui: devices, jobs and predictors as server-rendered pages."""

from server.ui.routes import router

__all__ = ["router"]
