"""The app's path templates with their methods, read once from the OpenAPI spec (plus the undocumented docs routes),
for labelling metrics by template and for answering 405 with every method a path allows."""

from __future__ import annotations

import re
from functools import cached_property

from fastapi import FastAPI
from starlette.routing import Mount, compile_path


class RouteTable:
    def __init__(self, app: FastAPI) -> None:
        self.app = app

    @cached_property
    def _templates(self) -> list[tuple[re.Pattern[str], str, frozenset[str]]]:
        # Built on first use, when every router has been included.
        methods: dict[str, set[str]] = {
            path: {method.upper() for method in operations} for path, operations in self.app.openapi()["paths"].items()
        }
        for route in self.app.router.routes:
            if isinstance(getattr(route, "path", None), str) and getattr(route, "methods", None):
                methods.setdefault(route.path, set()).update(route.methods)
            if isinstance(route, Mount) and isinstance(route.app, FastAPI):  # a mounted app: the dashboard
                for path, operations in route.app.openapi()["paths"].items():
                    methods.setdefault(route.path + path, set()).update(method.upper() for method in operations)
        for allowed in methods.values():
            if "GET" in allowed:
                allowed.add("HEAD")  # Starlette answers HEAD wherever it answers GET
        # Literal segments win over parameters: fewer parameters first.
        ordered = sorted(methods, key=lambda path: path.count("{"))
        return [(compile_path(path)[0], path, frozenset(methods[path])) for path in ordered]

    def match(self, path: str) -> tuple[str, frozenset[str]] | None:
        """The template `path` belongs to and the methods it allows, or None for no known route."""
        for regex, template, allowed in self._templates:
            if regex.match(path):
                return template, allowed
        return None
