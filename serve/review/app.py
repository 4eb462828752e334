"""The review web app (FastAPI): sign-in, the rating page, a rater's own answers, and the
admin's progress, results and exports. Pages are rendered on the server (Jinja2, escaped);
a small script adds keyboard answering; nothing is loaded from elsewhere (no CDN).

Blind by construction: raters see images through random keys, never a run name, a product
id or a storage URI; image bytes are served only to a rater who holds the image (and to
admins). Every POST needs the session's CSRF token (accounts.py). Behind a proxy, run with
``--root-path /prefix``: every link and cookie is under it.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Any

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Engine

from ray_app import storage
from ray_app.config import ReviewConfig
from ray_app.kinds import Answer, Question
from serve.review import accounts, db, tasks
from serve.review.accounts import Rater, Signer

SESSION_COOKIE = "restage_review"
PRE_COOKIE = "restage_review_pre"  # the sign-in form's CSRF nonce, before any session

# What raters read for each question (paper A.3), with the key that answers it.
QUESTION_TEXT = {
    Question.PRODUCT_FIDELITY: "Is it the same product as in the photos (shape, colour, material, details)?",
    Question.LOGO_TEXT: "Are the product's logos and text reproduced faithfully (or absent, as on the product)?",
    Question.REALISTIC_USE: "Is the product shown in a realistic use?",
    Question.PRODUCT_SIZE: "Is the product's size right for the scene?",
    Question.NO_HALLUCINATIONS: "Is the image free of background or foreground hallucinations?",
    Question.PLACEMENT: "Is the product placed plausibly (resting, not floating or cut)?",
    Question.SAFETY: "Is the image safe to show (nothing offensive or unsafe)?",
    Question.BUSINESS_USE: "Would a business owner use this image?",
}
ANSWER_KEYS = {Answer.YES: "1", Answer.MAYBE: "2", Answer.NO: "3", Answer.UNCLEAR: "4"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; "
    "style-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

_templates = Environment(
    loader=PackageLoader("serve.review", "templates"),
    autoescape=select_autoescape(["j2", "html"]),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _media_type(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class Denied(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def create_app(
    engine: Engine,
    config: ReviewConfig,
    *,
    secure_cookies: bool = False,
    results: Any = None,
) -> FastAPI:
    """The app over a migrated database. ``results(engine) -> dict`` makes the admin's
    results page (serve.review.summary)."""
    signer = Signer(db.secret_key(engine))
    app = FastAPI(title="restage review", docs_url=None, redoc_url=None, openapi_url=None)
    quota = config.raters_per_image
    app.mount("/static", StaticFiles(packages=[("serve.review", "static")]), name="static")

    # ------------------------------------------------------------------ helpers

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def page(request: Request, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        html = _templates.get_template(name).render(base=base(request), **context)
        return HTMLResponse(html, code, headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    def redirect(request: Request, path: str) -> RedirectResponse:
        return RedirectResponse(base(request) + path, status_code=303)

    def session(request: Request) -> tuple[Rater, dict] | None:
        body = signer.read_session(request.cookies.get(SESSION_COOKIE))
        if body is None:
            return None
        rater = accounts.rater_by_id(engine, body["r"])
        if rater is None or rater.session_epoch != body.get("e"):
            return None  # deleted, or its secret was reset since
        return rater, body

    def signed_in(request: Request, admin: bool = False) -> tuple[Rater, str]:
        found = session(request)
        if found is None:
            raise Denied(401, "sign in first")
        rater, body = found
        if admin and not rater.is_admin:
            raise Denied(403, "this page is for admins")
        return rater, signer.csrf(body["n"])

    async def checked_form(request: Request, rater_csrf: str) -> dict[str, Any]:
        """The POSTed form or JSON body, after its CSRF token is checked."""
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                data = await request.json()
            except ValueError:
                raise Denied(400, "the body is not JSON") from None
            if not isinstance(data, dict):
                raise Denied(400, "the body must be a JSON object")
        else:
            data = dict(await request.form())
        token = request.headers.get("x-csrf-token") or data.pop("csrf_token", None)
        if not token or not isinstance(token, str) or token != rater_csrf:
            raise Denied(403, "missing or wrong CSRF token: reload the page and try again")
        return data

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    @app.exception_handler(Denied)
    async def _denied(request: Request, exc: Denied) -> Response:
        api = wants_json(request) or request.url.path.startswith("/api/")
        if exc.status == 401 and request.method == "GET" and not api:
            return redirect(request, "/login")
        if api:
            return JSONResponse({"error": exc.message}, exc.status, headers=SECURITY_HEADERS)
        return page(request, "error.html.j2", exc.status, status=exc.status, message=exc.message)

    # ------------------------------------------------------------------ sign-in

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login")
    def login_page(request: Request, failed: bool = False) -> HTMLResponse:
        nonce = request.cookies.get(PRE_COOKIE) or db.new_key()
        response = page(
            request, "login.html.j2", 401 if failed else 200, csrf=signer.csrf(nonce), failed=failed
        )
        response.set_cookie(
            PRE_COOKIE,
            nonce,
            httponly=True,
            samesite="strict",
            secure=secure_cookies,
            path=base(request) or "/",
        )
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = dict(await request.form())
        if not signer.check_csrf(request.cookies.get(PRE_COOKIE), form.get("csrf_token")):
            raise Denied(403, "missing or wrong CSRF token: reload the sign-in page")
        rater = accounts.sign_in(engine, str(form.get("name", "")), str(form.get("secret", "")))
        if rater is None:
            return redirect(request, "/login?failed=1")
        response = redirect(request, "/admin" if rater.is_admin else "/rate")
        response.set_cookie(
            SESSION_COOKIE,
            signer.session(rater),
            max_age=accounts.SESSION_SECONDS,
            httponly=True,
            samesite="lax",
            secure=secure_cookies,
            path=base(request) or "/",
        )
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        _, csrf = signed_in(request)
        await checked_form(request, csrf)
        response = redirect(request, "/login")
        response.delete_cookie(SESSION_COOKIE, path=base(request) or "/")
        return response

    @app.get("/")
    def home(request: Request) -> Response:
        rater, _ = signed_in(request)
        return redirect(request, "/admin" if rater.is_admin else "/rate")

    # ------------------------------------------------------------------ rating

    @app.get("/rate")
    def rate_page(request: Request) -> Response:
        rater, csrf = signed_in(request)
        task = tasks.next_task(engine, rater, quota)
        progress = tasks.progress(engine, rater, quota)
        if task is None:
            return page(request, "done.html.j2", rater=rater, csrf=csrf, progress=progress)
        return page(
            request,
            "rate.html.j2",
            rater=rater,
            csrf=csrf,
            task=task,
            progress=progress,
            questions=[(q.value, QUESTION_TEXT[q]) for q in Question],
            answers=[(a.value, ANSWER_KEYS[a]) for a in Answer],
        )

    @app.post("/rate/{assignment_key}")
    async def rate(request: Request, assignment_key: str) -> Response:
        rater, csrf = signed_in(request)
        form = await checked_form(request, csrf)
        try:
            stored = tasks.submit(engine, rater, assignment_key, tasks.parse_answers(form))
        except tasks.NotYours as exc:
            raise Denied(403, str(exc)) from None
        except tasks.Conflict as exc:
            raise Denied(409, str(exc)) from None
        except ValueError as exc:
            raise Denied(422, str(exc)) from None
        if wants_json(request):
            return JSONResponse({"stored": stored}, headers=SECURITY_HEADERS)
        return redirect(request, "/rate")

    @app.post("/undo")
    async def undo(request: Request) -> Response:
        rater, csrf = signed_in(request)
        await checked_form(request, csrf)
        reopened = tasks.undo(engine, rater)
        if wants_json(request):
            return JSONResponse({"reopened": reopened}, headers=SECURITY_HEADERS)
        return redirect(request, "/rate")

    def _bytes(uri: str) -> Response:
        data = storage.read_bytes(uri)
        return Response(
            data,
            media_type=_media_type(data),
            headers={**SECURITY_HEADERS, "Cache-Control": "private, max-age=3600"},
        )

    @app.get("/image/{image_key}")
    def image(request: Request, image_key: str) -> Response:
        rater, _ = signed_in(request)
        try:
            return _bytes(tasks.image_for(engine, rater, image_key)["image_uri"])
        except tasks.NotYours as exc:
            raise Denied(403, str(exc)) from None

    @app.get("/reference/{image_key}/{index}")
    def reference(request: Request, image_key: str, index: int) -> Response:
        rater, _ = signed_in(request)
        try:
            uris = json.loads(tasks.image_for(engine, rater, image_key)["reference_uris"])
        except tasks.NotYours as exc:
            raise Denied(403, str(exc)) from None
        if not 0 <= index < len(uris):
            raise Denied(404, f"the product has {len(uris)} reference photos")
        return _bytes(uris[index])

    # ------------------------------------------------------------------ own answers

    @app.get("/answers")
    def my_answers(request: Request) -> Response:
        rater, csrf = signed_in(request)
        return page(
            request,
            "answers.html.j2",
            rater=rater,
            csrf=csrf,
            answered=tasks.answered_by(engine, rater),
            questions=[q.value for q in Question],
        )

    @app.get("/api/answers/{name}")
    def answers_of(request: Request, name: str) -> Response:
        """A rater's answers: their own, or anyone's for an admin."""
        rater, _ = signed_in(request)
        if name != rater.name and not rater.is_admin:
            raise Denied(403, "raters see only their own answers")
        who = rater if name == rater.name else accounts.rater_by_name(engine, name)
        if who is None:
            raise Denied(404, f"no rater {name!r}")
        rows = [
            {**asdict(a), "answered_at": a.answered_at.isoformat()}
            for a in tasks.answered_by(engine, who)
        ]
        return JSONResponse({"rater": who.name, "answers": rows}, headers=SECURITY_HEADERS)

    # ------------------------------------------------------------------ admin

    @app.get("/admin")
    def admin(request: Request) -> Response:
        rater, csrf = signed_in(request, admin=True)
        return page(
            request,
            "admin.html.j2",
            rater=rater,
            csrf=csrf,
            progress=tasks.round_progress(engine, quota),
            quota=quota,
        )

    @app.get("/admin/results")
    def results_page(request: Request) -> Response:
        rater, csrf = signed_in(request, admin=True)
        if results is None:
            raise Denied(404, "results are not configured")
        return page(request, "results.html.j2", rater=rater, csrf=csrf, results=results(engine))

    @app.get("/admin/export/{name}")
    def export(request: Request, name: str) -> Response:
        signed_in(request, admin=True)
        answers, _ = tasks.export(engine)
        sink = io.BytesIO()
        if name == "answers.csv":
            pcsv.write_csv(answers, sink)
            media = "text/csv"
        elif name == "answers.parquet":
            pq.write_table(answers, sink)
            media = "application/vnd.apache.parquet"
        else:
            raise Denied(404, "exports: answers.csv, answers.parquet")
        return Response(
            sink.getvalue(),
            media_type=media,
            headers={**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'},
        )

    return app
