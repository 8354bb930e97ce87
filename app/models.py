"""Every ORM model, imported in one place so Alembic and create-all see the whole schema."""

from app.adapters.models import AdapterVersion
from app.audit.models import AuditEvent
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.callbacks.models import CallbackDelivery
from app.core.db import Base
from app.deployments.models import Deployment, DeploymentTarget, MergedExport
from app.forget_requests.models import ForgetRequest
from app.jobs.models import UnlearningJob, job_requests
from app.ui.models import DashboardSession

__all__ = [
    "AdapterVersion",
    "ApiKey",
    "AuditEvent",
    "Base",
    "RegisteredModel",
    "CallbackDelivery",
    "DashboardSession",
    "Deployment",
    "DeploymentTarget",
    "ForgetRequest",
    "MergedExport",
    "UnlearningJob",
    "job_requests",
]
