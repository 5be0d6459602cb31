"""The console's routes: sign-in, pages, and CSRF-checked action forms.

Pages are rendered on the server with Jinja2 (autoescaped); the stylesheet and the small
script ship in this package, so the console works offline. Every read goes through
:mod:`api.console.data`, every change through :mod:`api.console.actions`.

Over 300 lines on purpose: one router factory holds every console page and action, so
they share one session, CSRF and template plumbing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape

from api.console import actions, data
from api.console.session import COOKIE, MAX_AGE_S, Session, Sessions
from api.console.timeline import timeline
from api.threads import blocking
from saga.diagram import definition, render_svg, taken_from_history
from saga.errors import DomainError, GenerationUnreadable, NotFound
from saga.machine import STATES

log = logging.getLogger(__name__)
PREFIX = "/console"
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
MAX_FORM_BYTES = 16 * 1024
_SECURITY_HEADERS = {
    # Everything is served from here; inline scripts are not needed, inline styles only in SVG.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' http: https: data:; "
                               "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class _Refused(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


def _unreadable_message(exc: GenerationUnreadable) -> str:
    """What support can still learn about a generation whose stored row cannot be read."""
    attention = exc.extra.get("attention")
    parked = (f"It is parked ({attention['kind']}) since {attention['since']}: "
              f"{attention['reason']}." if attention else "Nothing has parked it yet.")
    gid = exc.extra.get("generation_id")
    return (f"Generation {gid} is stored in state {exc.extra.get('state')}, but its row "
            f"cannot be read. {parked} Repair the row first, then retry it with "
            f"POST /api/v1/generations/{gid}/support/retry.")


def console_router(deps: Any) -> APIRouter:
    """``deps`` is the app's ``ApiDeps`` (``bus``, ``queries``, ``api_keys``)."""
    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    service = deps.queries
    asset_links = getattr(deps, "asset_links", None)
    sessions = Sessions(deps.api_keys)
    machine = definition()
    env = Environment(loader=PackageLoader("api.console", "templates"),
                      autoescape=select_autoescape(default=True), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["state_label"] = lambda s: str(s).replace("_", " ")
    env.filters["browser_url"] = _browser_url
    env.filters["when"] = _when

    # -- plumbing -------------------------------------------------------------------------
    def set_cookie(response: Response, request: Request, value: str, max_age: int) -> None:
        response.set_cookie(COOKIE, value, max_age=max_age, path=PREFIX, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")

    def page(request: Request, session: Session, template: str, status: int = 200,
             **context: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            request=request, prefix=PREFIX, csrf=sessions.csrf_token(session),
            signed_in=session.signed_in, **context)
        response = HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)
        return response

    def session_of(request: Request) -> Session | None:
        return sessions.load(request.cookies.get(COOKIE))

    def to_sign_in() -> Response:
        return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)

    async def form(request: Request) -> dict[str, str]:
        raw = await request.body()
        if len(raw) > MAX_FORM_BYTES:
            raise _Refused(413, "Too large", "The form is too large.")
        try:
            parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            raise _Refused(400, "Bad form", "The form is not valid UTF-8.") from None
        return {k: v[0] for k, v in parsed.items()}

    async def checked_post(request: Request, *, signed_in: bool = True
                           ) -> tuple[Session, dict[str, str]]:
        """The session and the form of a POST whose CSRF token matches its session."""
        session = session_of(request)
        fields = await form(request)
        if not sessions.csrf_ok(session, fields.get("csrf_token")):
            raise _Refused(403, "Refused", "The form's security token is missing or does not "
                           "belong to this session. Reload the page and try again.")
        assert session is not None
        if signed_in and not session.signed_in:
            raise _Refused(401, "Signed out", "Sign in first.")
        return session, fields

    def refused(request: Request, exc: _Refused) -> Response:
        session = session_of(request) or sessions.new()[1]
        return page(request, session, "message.html", exc.status, title=exc.title,
                    message=exc.message)

    async def read(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await blocking(fn, *args, **kwargs)

    def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        async def run(request: Request, *args: Any, **kwargs: Any) -> Response:
            try:
                result: Response = await handler(request, *args, **kwargs)
                return result
            except _Refused as exc:
                return refused(request, exc)
            except actions.NotAvailableYet as exc:
                return refused(request, _Refused(501, "Not available yet", str(exc) + "."))
            except NotFound as exc:
                return refused(request, _Refused(404, "Not found", exc.message))
            except DomainError as exc:
                return refused(request, _Refused(409, "Not possible now", exc.message))
        return run

    # -- static, sign-in, sign-out --------------------------------------------------------
    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        body = resources.files("api.console").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=300",
                                 "X-Content-Type-Options": "nosniff"})

    @router.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        session = session_of(request)
        if session is not None and session.signed_in:
            return RedirectResponse(f"{PREFIX}/", status_code=303)
        cookie, anonymous = sessions.new()
        response = page(request, anonymous, "sign_in.html", error=None)
        set_cookie(response, request, cookie, MAX_AGE_S)
        return response

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        try:
            session, fields = await checked_post(request, signed_in=False)
        except _Refused as exc:
            return refused(request, exc)
        key = fields.get("api_key", "")
        role = sessions.role_of(key) if key.strip() else None
        if role != "support":
            error = ("This is the service key; the console needs the support key."
                     if role == "service" else "That API key is not valid.")
            log.info("console sign-in refused (%s)", "service key" if role else "wrong key")
            return page(request, session, "sign_in.html", 401 if role is None else 403,
                        error=error)
        cookie, _fresh = sessions.new(key)
        response = RedirectResponse(f"{PREFIX}/", status_code=303)
        set_cookie(response, request, cookie, MAX_AGE_S)
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        try:
            await checked_post(request, signed_in=False)
        except _Refused as exc:
            return refused(request, exc)
        response = to_sign_in()
        response.delete_cookie(COOKIE, path=PREFIX, httponly=True, samesite="strict")
        return response

    # -- pages ----------------------------------------------------------------------------
    @router.get("", include_in_schema=False)
    async def root_redirect() -> Response:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @router.get("/")
    async def generations_page(request: Request, user_id: str = "", state: str = "",
                               since: str = "", until: str = "", cursor: str = "") -> Response:
        session = session_of(request)
        if session is None or not session.signed_in:
            return to_sign_in()
        errors: list[str] = []
        user = user_id.strip() or None
        if user is not None and len(user) > 64:
            errors.append("User id: at most 64 characters.")
        chosen = state if state in STATES else None
        if state and chosen is None:
            errors.append(f"State: {state!r} is not a state of the machine.")
        start, end = _parse_time(since, "From", errors), _parse_time(until, "To", errors)
        result = data.Page([], None)
        if not errors:
            try:
                result = await read(data.search_generations, service, user_id=user,
                                    state=chosen, since=start, until=end,
                                    cursor=cursor or None)
            except data.BadCursor:
                errors.append("The page link is not valid any more; start from the first page.")
        counts = await read(data.state_counts, service)
        attention = await read(data.attention, service)
        filters = {"user_id": user_id, "state": state, "since": since, "until": until}
        next_link = (f"{PREFIX}/?" + urlencode({**{k: v for k, v in filters.items() if v},
                                                "cursor": result.next_cursor})
                     if result.next_cursor else None)
        return page(request, session, "generations.html", 422 if errors else 200,
                    title="Generations", errors=errors, page=result, counts=counts,
                    attention=attention, filters=filters, states=STATES, next_link=next_link,
                    first_link=(f"{PREFIX}/?" + urlencode({k: v for k, v in filters.items()
                                                           if v})) if cursor else None)

    @router.get("/generations/{generation_id}")
    async def generation_page(request: Request, generation_id: str) -> Response:
        session = session_of(request)
        if session is None or not session.signed_in:
            return to_sign_in()
        try:
            view = await read(data.generation, service, generation_id, asset_links)
            hist = await read(data.history, service, generation_id)
        except NotFound as exc:
            return refused(request, _Refused(404, "Not found", exc.message))
        except GenerationUnreadable as exc:
            return refused(request, _Refused(409, "Generation cannot be read",
                                             _unreadable_message(exc)))
        svg = render_svg(machine, current=hist["state"],
                         taken=taken_from_history(hist["events"]),
                         title=f"State diagram: this generation is {hist['state']}")
        holds = await read(data.open_holds, service, generation_id=generation_id)
        terminal = data.is_terminal(view["state"])
        offered = {
            "cancel": not terminal and _compensation_target(hist["events"]) in (
                None, "awaiting_selection"),
            "retry": bool(view.get("attention")),
            "resolve": view["state"] == "compensating" and bool(holds),
        }
        return page(request, session, "generation.html", title=f"Generation {generation_id}",
                    g=view, svg=svg, lines=timeline(hist["events"]), holds=holds,
                    offered=offered, done=request.query_params.get("done"),
                    # OpenTelemetry trace ids in the history, first one first (a support
                    # action from the console starts a trace of its own)
                    traces=list(dict.fromkeys(e["trace_id"] for e in hist["events"]
                                              if e.get("trace_id"))))

    @router.get("/accounts")
    async def account_lookup(request: Request, user_id: str = "") -> Response:
        session = session_of(request)
        if session is None or not session.signed_in:
            return to_sign_in()
        if user_id.strip():
            return RedirectResponse(f"{PREFIX}/accounts/{user_id.strip()}", status_code=303)
        return RedirectResponse(f"{PREFIX}/", status_code=303)

    @router.get("/accounts/{user_id}")
    async def account_page(request: Request, user_id: str) -> Response:
        session = session_of(request)
        if session is None or not session.signed_in:
            return to_sign_in()
        try:
            account = await read(data.account, service, user_id)
        except NotFound as exc:
            return refused(request, _Refused(404, "Not found", exc.message))
        holds = await read(data.open_holds, service, user_id=user_id)
        journal = await read(data.account_journal, service, user_id)
        return page(request, session, "account.html", title=f"Account {user_id}",
                    account=account, holds=holds, journal=journal)

    @router.get("/dead-letters")
    async def dead_letters_page(request: Request) -> Response:
        session = session_of(request)
        if session is None or not session.signed_in:
            return to_sign_in()
        letters = await read(data.dead_letters, service)
        done = request.query_params.get("done")
        return page(request, session, "dead_letters.html", title="Dead letters",
                    letters=letters, done=done if done in ("replayed", "discarded") else None)

    # -- actions ----------------------------------------------------------------------------
    def reason_of(fields: dict[str, str]) -> str:
        reason = fields.get("reason", "").strip()
        if not 1 <= len(reason) <= 500:
            raise _Refused(422, "Reason needed", "Give a reason of 1 to 500 characters; it is "
                           "recorded in the generation's history.")
        return reason

    @router.post("/generations/{generation_id}/cancel")
    @guarded
    async def cancel(request: Request, generation_id: str) -> Response:
        _session, fields = await checked_post(request)
        await read(actions.cancel, deps, generation_id, reason_of(fields))
        return _back(generation_id, "cancelled")

    @router.post("/generations/{generation_id}/retry")
    @guarded
    async def retry(request: Request, generation_id: str) -> Response:
        _session, fields = await checked_post(request)
        await read(actions.retry, deps, generation_id, reason_of(fields))
        return _back(generation_id, "retried")

    @router.post("/generations/{generation_id}/resolve")
    @guarded
    async def resolve(request: Request, generation_id: str) -> Response:
        _session, fields = await checked_post(request)
        reason = reason_of(fields)
        outcome = fields.get("outcome", "")
        if outcome not in ("released", "committed"):
            raise _Refused(422, "Outcome needed", "Choose whether billing released or "
                           "committed the hold.")
        hold_id = fields.get("hold_id", "")
        if not hold_id:
            raise _Refused(422, "Hold needed", "Choose the hold to resolve.")
        await read(actions.resolve, deps, generation_id, reason, hold_id, outcome)
        return _back(generation_id, "resolved")

    @router.post("/dead-letters/{dead_letter_id}/replay")
    @guarded
    async def replay(request: Request, dead_letter_id: str) -> Response:
        _session, fields = await checked_post(request)
        await read(actions.replay_dead_letter, deps, dead_letter_id, reason_of(fields))
        return RedirectResponse(f"{PREFIX}/dead-letters?done=replayed", status_code=303)

    @router.post("/dead-letters/{dead_letter_id}/discard")
    @guarded
    async def discard(request: Request, dead_letter_id: str) -> Response:
        _session, fields = await checked_post(request)
        await read(actions.discard_dead_letter, deps, dead_letter_id, reason_of(fields))
        return RedirectResponse(f"{PREFIX}/dead-letters?done=discarded", status_code=303)

    return router


def _compensation_target(events: list[dict[str, Any]]) -> str | None:
    """Where a saga in ``compensating`` lands once the release goes through (None: not
    compensating, or not recorded). Only one headed back to selection can still be cancelled."""
    for event in reversed(events):
        if event.get("kind") == "transition" and event.get("to_state") != "compensating":
            return None
        if event.get("kind") == "transition" and event.get("trigger") == "cancel":
            return "cancelled"
        if event.get("kind") == "transition" and event.get("from_state") != "compensating":
            target = (event.get("detail") or {}).get("target")
            return str(target) if target else None
    return None


def _back(generation_id: str, done: str) -> Response:
    return RedirectResponse(f"{PREFIX}/generations/{generation_id}?done={done}",
                            status_code=303)


def _parse_time(value: str, label: str, errors: list[str]) -> datetime | None:
    if not value.strip():
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        errors.append(f"{label}: not a date and time (YYYY-MM-DDTHH:MM).")
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _browser_url(url: Any) -> bool:
    """Whether a browser can show this URL as an image (s3:// and others are shown as text)."""
    return isinstance(url, str) and url.lower().startswith(("http://", "https://"))


def _when(value: Any) -> str:
    if not value:
        return "—"
    try:
        at = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
