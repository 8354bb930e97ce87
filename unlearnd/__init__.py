"""The `unlearnd` command, above the service (app) and the worker, which it starts."""
