"""The parts of running one job, each one job of its own: claiming it (claim), proving the worker alive and writing
progress (liveness), checkpoints (checkpoints), publishing (publishing) and recording how an attempt ended
(outcomes). worker/job_runner.py puts them together."""
