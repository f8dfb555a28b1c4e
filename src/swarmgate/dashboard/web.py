"""What every dashboard page shares: the session cookie, CSRF tokens, forms and rendering.

The dashboard signs in with the same sessions as ``/v1/auth`` (``sg_sess_…``), kept in an
HttpOnly, SameSite=Lax cookie scoped to ``/dashboard``. Every form that changes something
carries a CSRF token: for a signed-in page it is an HMAC of the session token, so it needs
no server state and works on any gateway of a scaled-out network; before sign-in it is
the double-submit value of a short-lived cookie of its own. A POST whose ``Origin`` names
another site is refused as well.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from fastapi import Request
from fastapi.routing import APIRoute
from markupsafe import Markup
from starlette.responses import HTMLResponse, RedirectResponse, Response

from swarmgate.accounts import service
from swarmgate.accounts.keys import Principal
from swarmgate.accounts.signin import SESSION_PREFIX
from swarmgate.api.deps import read_body
from swarmgate.errors import AuthError, RequestError, SwarmgateError
from swarmgate.gateway import Gateway

SESSION_COOKIE = "sg_dash"
PRESESSION_COOKIE = "sg_dash_csrf"
COOKIE_PATH = "/dashboard"
FORM_LIMIT_BYTES = 64 * 1024
_CSRF_CONTEXT = b"swarmgate dashboard form"

# Pages are same-origin only: no inline script, no framing, nothing fetched from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def csrf_for_session(session_token: str) -> str:
    """The form token of a signed-in page: only someone who holds the session has it."""
    return hmac.new(session_token.encode(), _CSRF_CONTEXT, hashlib.sha256).hexdigest()


def tokens_match(presented: str | None, expected: str) -> bool:
    return bool(presented) and hmac.compare_digest(str(presented).encode(), expected.encode())


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path of this site, never another site."""
    if not target or not target.startswith(COOKIE_PATH) or target.startswith("//"):
        return COOKIE_PATH + "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return COOKIE_PATH + "/"
    return target


class SignInRequired(Exception):
    """Raised by a page that needs a session; answered with a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


class CsrfRejected(SwarmgateError):
    status_code = 403
    code = "CSRF_REJECTED"
    type = "invalid_request_error"


@dataclass(frozen=True)
class Form:
    """An ``application/x-www-form-urlencoded`` body, bounded in size."""

    fields: Mapping[str, list[str]]

    @classmethod
    async def read(cls, request: Request) -> Form:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind and kind != "application/x-www-form-urlencoded":
            raise RequestError("Forms are sent as application/x-www-form-urlencoded.")
        raw = await read_body(request, FORM_LIMIT_BYTES)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise RequestError("The form is not valid UTF-8.") from None
        return cls(parse_qs(text, keep_blank_values=True, max_num_fields=2_000))

    def get(self, name: str, default: str = "") -> str:
        values = self.fields.get(name)
        return values[0] if values else default

    def all(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))

    def checked(self, name: str) -> bool:
        return self.get(name) in ("on", "1", "true", "yes")

    def optional_int(self, name: str, *, low: int, high: int, label: str) -> int | None:
        text = self.get(name).strip().replace(",", "").replace("_", "")
        if not text:
            return None
        if not text.isdigit() or not low <= int(text) <= high:
            raise RequestError(f"{label} must be a whole number from {low} to {high}.", param=name)
        return int(text)


@dataclass(frozen=True)
class Viewer:
    """The signed-in account looking at a page."""

    principal: Principal
    session_token: str
    account: dict[str, Any]

    @property
    def account_id(self) -> str:
        return self.principal.account_id

    @property
    def csrf(self) -> str:
        return csrf_for_session(self.session_token)

    @property
    def roles(self) -> list[str]:
        return list(self.account.get("roles", []))


def check_origin(request: Request) -> None:
    """Refuses a form posted from another site (a second line behind the CSRF token)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise CsrfRejected("This form was sent from another site.")
        return
    if urlsplit(origin).netloc != request.headers.get("host", ""):
        raise CsrfRejected("This form was sent from another site.")


async def signed_in(request: Request, gateway: Gateway) -> Viewer | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or not token.startswith(SESSION_PREFIX):
        return None
    try:
        principal = await gateway.sessions.verify(token)
    except AuthError:
        return None
    try:
        account = await service.get_account(gateway.engine, principal.account_id)
    except SwarmgateError:
        return None
    return Viewer(principal, token, account)


async def require_viewer(request: Request, gateway: Gateway) -> Viewer:
    viewer = await signed_in(request, gateway)
    if viewer is None:
        path = request.url.path
        if request.url.query:
            path += "?" + request.url.query
        raise SignInRequired(path if request.method == "GET" else COOKIE_PATH + "/")
    return viewer


async def signed_form(request: Request, viewer: Viewer) -> Form:
    """The form of a signed-in page, once its origin and CSRF token are checked."""
    check_origin(request)
    form = await Form.read(request)
    if not tokens_match(form.get("csrf"), viewer.csrf):
        raise CsrfRejected("This form has expired or did not come from this dashboard; reload.")
    return form


def _usd(micros: int | None) -> str:
    if micros is None:
        return "—"
    sign = "-" if micros < 0 else ""
    micros = abs(int(micros))
    dollars, rest = divmod(micros, 1_000_000)
    cents = rest // 10_000
    text = f"{sign}${dollars:,}.{cents:02d}"
    if rest % 10_000:
        # Sub-cent amounts are what per-token billing is made of: show them exactly.
        text = f"{sign}${dollars:,}.{rest:06d}".rstrip("0")
    return text


def _when(value: datetime | date | str | float | None) -> str:
    """An instant as the dashboard shows it: to the minute, in UTC."""
    if value is None or value == "":
        return "—"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return value.isoformat()


def _number(value: int | None) -> str:
    return "—" if value is None else f"{int(value):,}"


class Templates:
    """Jinja templates from the package, compiled once at start-up (no disk reads later)."""

    PAGES = (
        "signin.html",
        "signup.html",
        "overview.html",
        "keys.html",
        "key.html",
        "usage.html",
        "conversations.html",
        "conversation.html",
        "workflows.html",
        "workflow.html",
        "provider.html",
        "network.html",
        "error.html",
    )

    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("swarmgate.dashboard", "templates"),
            autoescape=True,
            auto_reload=False,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(usd=_usd, when=_when, number=_number)
        self._pages = {name: self.env.get_template(name) for name in self.PAGES}

    def render(
        self,
        name: str,
        context: Mapping[str, Any],
        *,
        viewer: Viewer | None,
        status_code: int = 200,
        active: str = "",
    ) -> HTMLResponse:
        page = self._pages[name].render(
            viewer=viewer,
            account=viewer.account if viewer else None,
            csrf=viewer.csrf if viewer else "",
            active=active,
            **context,
        )
        return HTMLResponse(page, status_code=status_code, headers=SECURITY_HEADERS)


class StaticFiles:
    """The dashboard's own CSS and script, read once; nothing is fetched from elsewhere."""

    TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, str, str]] = {}
        folder = resources.files("swarmgate.dashboard").joinpath("static")
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            if suffix in self.TYPES:
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                self._files[entry.name] = (body, self.TYPES[suffix], etag)

    def response(self, name: str, if_none_match: str | None) -> Response:
        found = self._files.get(name)
        if found is None:
            return Response("not found", status_code=404, media_type="text/plain")
        body, media_type, etag = found
        headers = {
            "ETag": etag,
            "Cache-Control": "public, max-age=300",
            "X-Content-Type-Options": "nosniff",
        }
        if if_none_match == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=media_type, headers=headers)


@functools.cache
def compiled_pages() -> tuple[Templates, StaticFiles]:
    """The templates and static files, compiled once per process: they are package data
    and never change, and every app built in the process (tests build many) shares them."""
    return Templates(), StaticFiles()


def set_session_cookie(response: Response, request: Request, token: str, max_age: int) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


def new_presession(request: Request) -> str:
    """The double-submit token of the sign-in and sign-up forms (kept if already set)."""
    current = request.cookies.get(PRESESSION_COOKIE, "")
    if len(current) == 43:
        return current
    return secrets.token_urlsafe(32)


def set_presession_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        PRESESSION_COOKIE,
        token,
        max_age=3_600,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def redirect(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


class DashboardRoute(APIRoute):
    """Answers errors on dashboard pages as pages, not as JSON envelopes: a missing session
    redirects to sign-in, a refused request shows what went wrong with its status."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except SignInRequired as needed:
                return redirect(f"{COOKIE_PATH}/signin?next={quote(needed.next_path, safe='/')}")
            except SwarmgateError as error:
                gateway: Gateway = request.app.state.gateway
                pages: Templates = request.app.state.dashboard_templates
                viewer = await signed_in(request, gateway)
                return pages.render(
                    "error.html",
                    {"error": error},
                    viewer=viewer,
                    status_code=error.status_code,
                )

        return handle


def as_markup(svg: str) -> Markup:
    """An SVG this package drew from escaped parts, to be placed as is."""
    return Markup(svg)  # noqa: S704 - built by charts.py, which escapes every label
