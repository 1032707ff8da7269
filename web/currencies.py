from __future__ import annotations

from flask import Blueprint, Response

from common.currencies import all_currencies
from common.db import request_session
from web.render import json_response

bp = Blueprint("currencies", __name__)


@bp.get("/currencies")
def list_currencies() -> Response:
    with request_session() as session:
        currencies = all_currencies(session)
    return json_response(
        [
            {
                "code": currency.code,
                "name": currency.name,
                "decimals": currency.decimals,
                "commission_rate": str(currency.commission_rate.normalize()),
            }
            for currency in sorted(currencies, key=lambda c: c.code)
        ]
    )
