"""Unit tests need neither PostgreSQL nor Redis. Settings default to the embedded ones, under a folder of their own
(unless a service test session already chose one), so importing the app writes nothing into the checkout."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "UNLEARND_DATA_DIR" not in os.environ:
    os.environ["UNLEARND_DATA_DIR"] = tempfile.mkdtemp(prefix="unlearnd-unit-")
    atexit.register(shutil.rmtree, os.environ["UNLEARND_DATA_DIR"], ignore_errors=True)
