"""The browser playground served at `/` (static files in mtlm/serve/static, no CDN): it reads /v1/tasks, shows the
fields the model's tasks need, calls /v1/predict like any client (with the API key typed into it when the
server needs one) and draws every task's result: label score bars, entity spans highlighted in the text,
the QA answer highlighted in its context, the chosen choice. `mtlm serve --no-playground` leaves it out."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

HERE = Path(__file__).with_name("static")


def install_playground(app: FastAPI, api_key_required: bool) -> None:
    """GET / (the page), /playground/config.json ({"api_key_required"}) and the static files under
    /playground/; none of them is in the OpenAPI document, none holds model data (the page asks /v1)."""

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(HERE / "index.html", media_type="text/html")

    @app.get("/playground/config.json", include_in_schema=False)
    async def config():
        return JSONResponse({"api_key_required": api_key_required})

    app.mount("/playground", StaticFiles(directory=HERE), name="playground")
