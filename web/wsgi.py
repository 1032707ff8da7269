"""gunicorn entry point: `gunicorn --config python:web.gunicorn_conf web.wsgi:app`.

The settings are loaded once per process: by web.gunicorn_conf when gunicorn runs this
(it sizes the database pool to its threads), else here.
"""

from common.logs import configure_logging
from common.settings import get_settings
from web.app import create_app

settings = get_settings()
configure_logging("web", settings)

app = create_app(settings)
