"""`fcl-client serve`'s HTTP layer: FastAPI request/response models and routes over fcl_client/serving.py.

The bounds are the server's Classify bounds (common/wire_limits.py), so the edge and the server accept
the same requests. A flood is bounded twice: `PredictAdmission` admits at most `max_in_flight` predict
requests at once (reading its body included, up to `max_body_bytes`) and answers 503 with Retry-After
past that; uvicorn's `limit_concurrency` bounds open connections of every kind. With an API token,
`BearerAuth` refuses a /v1/ request without it before any of that (docs/edge-serving.md).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import wire_limits as wire
from common.labels import normalize_text, text_problem
from fcl_client.serving import MAX_IN_FLIGHT, EdgePredictor, HeadName, LoadedModel, NoHeadYet, Prediction

PREDICT_PATH = "/v1/predict"
PROTECTED_PREFIX = "/v1/"  # what an API token guards
BEARER_SCHEME = "bearer"
CHALLENGE = b'Bearer realm="fcl-client serve"'
RETRY_AFTER_S = 1
BODY_TIMEOUT_S = 30.0  # a predict body must arrive within this: a slow sender cannot hold a slot
# the longest valid body: every text at its longest, each character in its longest JSON form (a
# "\ud83d\ude00" escape pair, 12 bytes), with quotes and commas, plus room for the other fields
MAX_BODY_BYTES = (
    wire.MAX_CLASSIFY_TEXTS * (wire.CLASSIFY_TEXT_MAX_CHARS * wire.JSON_CHAR_MAX_BYTES + 4) + 4096
)

Text = Annotated[
    str,
    Field(
        min_length=1,
        max_length=wire.CLASSIFY_TEXT_MAX_CHARS,
        # what the validator below enforces, stated for clients and schema-driven tests
        json_schema_extra={"pattern": r"\S"},
        description=f"1-{wire.CLASSIFY_TEXT_MAX_CHARS} characters (Unicode code points), not only whitespace",
    ),
]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(
        min_length=1,
        max_length=wire.MAX_CLASSIFY_TEXTS,
        description=f"1-{wire.MAX_CLASSIFY_TEXTS} texts; each is NFC-normalised and stripped before encoding",
    )
    top_k: int = Field(
        wire.CLASSIFY_DEFAULT_TOP_K,
        ge=1,
        le=wire.CLASSIFY_TOP_K_MAX,
        description="labels per text, most probable first (fewer when the head knows fewer)",
    )
    head: HeadName = Field(
        "small",
        description="small: this node's small model; personal: the personalised FM head from the server",
    )
    abstain: bool = Field(
        True,
        description="mark texts below the head's calibrated confidence threshold out_of_scope "
        "(false: rankings only)",
    )

    @field_validator("texts")
    @classmethod
    def _usable(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            problem = text_problem(text)
            if problem is not None:
                raise ValueError(f"text {i} {problem}")
            if not normalize_text(text):
                raise ValueError(f"text {i} is only whitespace; send some characters to classify")
        return texts


class LabelScore(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1, description="softmax over every label of the head")


class TextResult(BaseModel):
    labels: list[LabelScore] = Field(description="most probable first")
    out_of_scope: bool = Field(
        False,
        description="the head abstains on this text: its confidence is below the head's calibrated "
        "threshold (the ranking is still given)",
    )
    confidence: float | None = Field(
        None, description="the threshold's score for this text (top probability); null without a threshold"
    )


class PredictResponse(BaseModel):
    head: HeadName = Field(description="the head that answered")
    head_version: int = Field(
        ge=0,
        description="small: tasks the small model has learned; personal: the personalised head's version",
    )
    snapshot: int = Field(ge=0, description="the checkpoint snapshot that answered (work dir checkpoints/)")
    num_labels: int = Field(ge=0, description="labels the head knows")
    results: list[TextResult] = Field(description="one per text, in request order")
    threshold: float | None = Field(
        None,
        description="the head's abstention threshold (null: it has none and never abstains, or "
        "abstain was false)",
    )


class ErrorResponse(BaseModel):
    detail: str


class HeadInfo(BaseModel):
    available: bool
    version: int = Field(ge=0, description="as PredictResponse.head_version")
    labels: list[str]


class FMInfo(BaseModel):
    name: str
    digest: str = Field(description="sha256 of the FM's files and encoding (as the server's)")
    feature_dim: int


class ModelResponse(BaseModel):
    fm: FMInfo
    snapshot: int = Field(ge=0)
    tasks_learned: int = Field(ge=0)
    task_name: str = Field(description="the task in progress when the snapshot was written, or empty")
    loaded_at: datetime
    small: HeadInfo
    personal: HeadInfo


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    snapshot: int = Field(ge=0)


def prediction_response(prediction: Prediction) -> PredictResponse:
    return PredictResponse(
        head=prediction.head,
        head_version=prediction.head_version,
        snapshot=prediction.snapshot,
        num_labels=prediction.num_labels,
        results=[
            TextResult(
                labels=[LabelScore(label=s.label, probability=s.probability) for s in r.labels],
                out_of_scope=r.out_of_scope,
                confidence=r.confidence,
            )
            for r in prediction.results
        ],
        threshold=prediction.threshold.value if prediction.threshold else None,
    )


def model_response(predictor: EdgePredictor, model: LoadedModel) -> ModelResponse:
    def head(name: HeadName) -> HeadInfo:
        return HeadInfo(available=model.has(name), version=model.version(name), labels=model.labels(name))

    fm = predictor.fm
    return ModelResponse(
        fm=FMInfo(name=fm.name, digest=predictor.fm_digest, feature_dim=fm.feature_dim),
        snapshot=model.snapshot,
        tasks_learned=model.tasks_learned,
        task_name=model.task_name,
        loaded_at=datetime.fromtimestamp(model.loaded_at, UTC),
        small=head("small"),
        personal=head("personal"),
    )


_OVERLOADED = {
    "model": ErrorResponse,
    "description": "more than the allowed predict requests are in progress; retry after Retry-After seconds",
    "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "no bearer token, or not this node's (only when serve runs with --api-token-file)",
    },
}
PREDICT_ERRORS: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    400: {"model": ErrorResponse, "description": "the body cannot be parsed (not UTF-8 JSON)"},
    409: {"model": ErrorResponse, "description": "the head asked for does not exist yet (run a round first)"},
    408: {"model": ErrorResponse, "description": f"the body did not arrive within {BODY_TIMEOUT_S:g} s"},
    413: {"model": ErrorResponse, "description": f"the body is over {MAX_BODY_BYTES} bytes"},
    503: _OVERLOADED,
}


def create_app(
    predictor: EdgePredictor,
    max_in_flight: int = MAX_IN_FLIGHT,
    max_body_bytes: int = MAX_BODY_BYTES,
    watch: bool = True,
    api_token: str | None = None,
) -> FastAPI:
    """The app; with `watch` its lifespan polls for newer checkpoints; it closes the predictor. With
    `api_token`, every /v1/ request must send 'Authorization: Bearer <api_token>'."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watch:
            predictor.start_watching()
        try:
            yield
        finally:
            predictor.close()

    app = FastAPI(
        title="fcl-client serve",
        summary="Predictions from this edge node's checkpointed learner",
        version="1",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def refused(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each offending input whole: up to a 6 MB body sent straight back
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post(
        PREDICT_PATH,
        response_model=PredictResponse,
        responses=PREDICT_ERRORS,
        summary="Top labels of each text, from the small model or the personalised head",
    )
    async def predict(request: PredictRequest) -> PredictResponse:
        future = predictor.submit(request.texts, request.top_k, request.head, request.abstain)
        try:
            prediction = await asyncio.wrap_future(future)
        except NoHeadYet as exc:
            raise HTTPException(409, str(exc)) from exc
        return prediction_response(prediction)

    @app.get(
        "/v1/model",
        response_model=ModelResponse,
        responses=UNAUTHORIZED,
        summary="The FM, the snapshot and both heads",
    )
    async def model() -> ModelResponse:
        return model_response(predictor, predictor.current)

    @app.get("/healthz", response_model=Health, summary="Up, and which snapshot it serves")
    async def healthz() -> Health:
        return Health(snapshot=predictor.current.snapshot)

    app.add_middleware(PredictAdmission, max_in_flight=max_in_flight, max_body_bytes=max_body_bytes)
    if api_token is not None:
        app.add_middleware(BearerAuth, token=api_token)  # added last: it runs first
        _declare_bearer(app)
    return app


def _declare_bearer(app: FastAPI) -> None:
    """The schema says which operations need the bearer token (the /v1/ ones), so clients and
    schema-driven tools send it."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                BEARER_SCHEME: {"type": "http", "scheme": "bearer"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith(PROTECTED_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{BEARER_SCHEME: []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class BearerAuth:
    """ASGI middleware: a /v1/ request without 'Authorization: Bearer <token>' gets 401 before its body
    is read, so a caller without the token never holds a predict slot. /healthz (probes) and the schema
    stay open: neither tells anything the node learned."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIX):
            given = _bearer_token(scope)
            # constant time: the answer's timing says nothing about how much of a guess was right
            if given is None or not hmac.compare_digest(given, self._token):
                detail = (
                    "send the node's API token as 'Authorization: Bearer TOKEN' (the contents of the "
                    "file given to fcl-client serve --api-token-file)"
                    if given is None
                    else "this is not the node's API token (fcl-client serve --api-token-file)"
                )
                challenge = CHALLENGE if given is None else CHALLENGE + b', error="invalid_token"'
                await _reply(send, 401, detail, [(b"www-authenticate", challenge)])
                return
        await self.app(scope, receive, send)


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class PredictAdmission:
    """ASGI middleware: admits at most `max_in_flight` predict requests at once, bodies of bounded size.

    It reads the body itself (so a request holds its slot while it uploads, and a body over the bound
    is refused unread), then hands it on to the app.
    """

    def __init__(self, app: ASGIApp, max_in_flight: int, max_body_bytes: int) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.max_body_bytes = max_body_bytes
        self.in_flight = 0  # touched on the event loop only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await _reply(
                send,
                503,
                f"{self.in_flight} predict requests are in progress, the most this node takes at once; "
                f"retry in {RETRY_AFTER_S} s",
                [(b"retry-after", str(RETRY_AFTER_S).encode())],
            )
            return
        self.in_flight += 1
        try:
            body = await self._read_body(scope, receive, send)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= 1

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once an error has been answered (too large, too slow)."""
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _reply(send, 413, self._too_large(int(declared)))
            return None
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await _reply(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s")
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _reply(send, 413, self._too_large(size))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> str:
        return (
            f"the body is {size} bytes or more, over the limit of {self.max_body_bytes} "
            f"({wire.MAX_CLASSIFY_TEXTS} texts of {wire.CLASSIFY_TEXT_MAX_CHARS} characters at most)"
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then what the connection says (a disconnect)

    return replay


async def _reply(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
