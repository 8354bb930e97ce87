"""The HTTP layer over every domain: dependencies, middleware, error handlers, health and metrics routes."""
