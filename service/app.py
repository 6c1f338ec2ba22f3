"""Where the Ray Serve application used to live; `service.app:build_app` in existing configs keeps working."""
from service.api.app import build_app  # noqa: F401
