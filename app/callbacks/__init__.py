"""Status callbacks. Importing the package registers the session listeners that record every status change."""

from app.callbacks import service  # noqa: F401
