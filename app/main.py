"""The FastAPI application: the routers of every domain behind the API layer's middleware and error handlers."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app.adapters.views import aliases as aliases_router
from app.adapters.views import router as adapters_router
from app.api.errors import add_error_handlers
from app.api.health import health
from app.api.limits import RequestBodyGuard
from app.api.metrics import HttpMetrics, Metrics
from app.api.metrics import router as metrics_router
from app.api.request_ids import RequestIds
from app.api.routes import RouteTable
from app.base_models.views import router as models_router
from app.callbacks.service import register_listeners
from app.callbacks.views import router as callback_secrets_router
from app.core.config import get_settings
from app.deployments.service import register_listeners as register_deployment_listeners
from app.deployments.views import router as deployments_router
from app.deployments.views import secret_router as deployment_secret_router
from app.evidence.views import router as evidence_router
from app.forget_requests.views import router as requests_router
from app.jobs.views import router as jobs_router
from app.retention.views import router as retention_router
from app.ui.app import create_ui

UI_PATH = "/ui"


def create_app() -> FastAPI:
    settings = get_settings()
    register_listeners()  # status changes made by API requests send their callbacks
    register_deployment_listeners()  # and moves of `current` their deployments
    app = FastAPI(title="unlearnd", version="0.1.0", description="Make a language model forget data on request.")
    v1 = APIRouter(prefix="/v1")
    for router in (
        requests_router,
        evidence_router,
        retention_router,
        jobs_router,
        models_router,
        adapters_router,
        aliases_router,
        deployments_router,
        deployment_secret_router,
        callback_secrets_router,
    ):
        v1.include_router(router)
    app.include_router(v1)
    app.include_router(health)
    app.include_router(metrics_router)
    app.mount(UI_PATH, create_ui())  # the dashboard: same process, same origin, same service functions
    app.state.metrics = Metrics()
    app.state.routes = RouteTable(app)
    add_error_handlers(app)
    app.add_middleware(
        RequestBodyGuard,
        max_bytes=settings.max_body_bytes,
        max_depth=settings.max_json_depth,
        form_prefix=f"{UI_PATH}/",
    )
    app.add_middleware(HttpMetrics, metrics=app.state.metrics)
    app.add_middleware(RequestIds)  # outermost, so even a refused body is logged with its id
    return app
