"""Onboarding progress."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from server.api.deps import Db
from server.auth import READ
from server.errors import NotFound
from server.models import Onboarding
from server.schemas import OnboardingOut, RowId
from server.services import onboarding as onboarding_service

router = APIRouter(prefix="/api/v1/onboardings", tags=["predictors"])


def onboarding_out(session: Session, onboarding: Onboarding) -> OnboardingOut:
    return OnboardingOut(
        id=onboarding.id,
        device=onboarding.device.name,
        space=onboarding.space.name,
        sampler=onboarding.sampler,
        samples=onboarding.samples,
        preset=onboarding.preset,
        budget=onboarding.budget,
        target_uncertainty=onboarding.target_uncertainty,
        rounds=onboarding.rounds,
        status=onboarding.status,
        predictor_id=onboarding.predictor_id,
        error=onboarding.error,
        created_at=onboarding.created_at,
        finished_at=onboarding.finished_at,
        **onboarding_service.progress(session, onboarding),
    )


@router.get("/{onboarding_id}", dependencies=[READ])
def read_onboarding(onboarding_id: RowId, session: Db) -> OnboardingOut:
    onboarding = session.get(Onboarding, onboarding_id)
    if onboarding is None:
        raise NotFound(f"no onboarding {onboarding_id}", "onboarding_id")
    return onboarding_out(session, onboarding)
