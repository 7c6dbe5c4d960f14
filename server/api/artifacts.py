"""Model artifacts, content-addressed by sha256."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Path, Request, status
from fastapi.responses import FileResponse

from server.api.deps import Db, ServicesDep
from server.auth import SUBMIT, Requires
from server.errors import NotFound
from server.models import Artifact, Scope
from server.schemas import ArtifactOut
from server.services.artifacts import check_onnx_upload

router = APIRouter(prefix="/api/v1/artifacts", tags=["artifacts"])
Sha256 = Path(pattern=r"^[0-9a-f]{64}$")


@router.get("/{sha256}", response_class=FileResponse, responses={200: {"content": {"application/octet-stream": {}}}},
            dependencies=[Depends(Requires(Scope.read, Scope.agent))])
def download_artifact(session: Db, services: ServicesDep, sha256: str = Sha256) -> FileResponse:
    artifact = session.get(Artifact, sha256)
    path = services.store.path(sha256)
    if artifact is None or not path.exists():
        raise NotFound(f"no artifact {sha256}", "sha256")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.{artifact.format}")


# the route reads the raw body itself, so the OpenAPI document learns of it here; without a schema
# client generators drop the upload
ONNX_BODY = {"requestBody": {"required": True, "description": "the ONNX model's bytes", "content": {
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[SUBMIT], openapi_extra=ONNX_BODY)
async def upload_artifact(request: Request, session: Db, services: ServicesDep) -> ArtifactOut:
    """Upload an ONNX model (raw bytes); it is checked with onnx.checker before it is stored."""
    data = await request.body()
    check_onnx_upload(data)
    sha256 = services.store.put(data)
    artifact = session.get(Artifact, sha256)
    if artifact is None:
        artifact = Artifact(sha256=sha256, format="onnx", size_bytes=len(data))
        session.add(artifact)
        session.flush()
    return ArtifactOut.model_validate(artifact)
