"""gunicorn entry point: `gunicorn --config python:web.gunicorn_conf web.wsgi:app`."""

from common.logs import configure_logging
from web.app import create_app

configure_logging("web")

app = create_app()
