"""What the web code reads from its application: the settings create_app() was given."""

from __future__ import annotations

from flask import Flask, current_app

from common.settings import Settings

EXTENSION = "remit.settings"


def settings_of(app: Flask) -> Settings:
    settings: Settings = app.extensions[EXTENSION]
    return settings


def current_settings() -> Settings:
    """The settings of the application handling the current request."""
    return settings_of(current_app)
