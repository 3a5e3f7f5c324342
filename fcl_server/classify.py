"""Classify on the server: texts → the server's FM → a knowledge head → the top-k labels (no gRPC here).

Concurrency: one thread (`Classifier.executor`) runs every Classify call's FM encode and head, one call
at a time. The FM's forward pass already uses every core through torch's intra-op threads (or the GPU),
so more encoders at once would only contend; and it keeps Classify off the RPC thread pool, whose
threads uploads and the other calls need. A call waits for the encoder on the event loop, holding no
thread, and at most `max_calls` calls are admitted at once (running or waiting): past that a call is
refused at once with RESOURCE_EXHAUSTED instead of queueing without bound. The distillation worker does
not pause for Classify (it yields to uploads only); its thread runs at a lower priority (--worker-nice),
so a Classify call gets the CPU first and a job goes on at the pace left to it.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common import wire_limits as wire
from common.algorithms.abstention import Threshold, abstains, confidence
from common.algorithms.obod import Head
from common.labels import normalize_text, text_problem
from common.package import PackageError, decode_package
from common.wire_limits import quoted
from fcl_server.blobs import BlobStore
from fcl_server.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted
from fcl_server.state import GLOBAL, PERSONAL, HeadVersion, Principal, State

if TYPE_CHECKING:
    from common.fm import FoundationModel
    from fcl_server.fm_host import FMHost

log = logging.getLogger(__name__)
MAX_CALLS = 32  # Classify calls admitted at once (ServerConfig.max_classify_calls default)
# decoded heads kept in memory, by their parameters' bytes: a head of 150 labels on a 384-dim FM is
# about 1.6 MB, one of 10,000 labels about 31 MB; the head in use is kept however big it is
HEAD_CACHE_BYTES = 256 * 1024 * 1024
ENCODE_BATCH = 128  # texts per FM forward pass (FoundationModel.encode sorts them by length first)


@dataclass(frozen=True)
class ClassifyQuery:
    """A Classify request as the domain takes it (convert.classify_query), not yet checked."""

    texts: Sequence[str]
    top_k: int
    scope: str  # GLOBAL or PERSONAL
    client_id: str = ""  # PERSONAL: whose head ("": the caller's own)


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float


@dataclass(frozen=True)
class TextResult:
    """One text's answer: the top labels, and whether the head abstains (docs/abstention.md)."""

    labels: list[LabelScore]  # most probable first
    out_of_scope: bool = False  # the head's confidence is below its threshold (never without one)
    confidence: float = 0.0  # the threshold's score of the text (0 without a threshold)


@dataclass(frozen=True)
class Prepared:
    """A checked query and the head that will answer it."""

    version: HeadVersion
    head: Head
    texts: list[str]  # normalised
    top_k: int


@dataclass(frozen=True)
class Classification:
    version: HeadVersion  # the head that answered
    results: list[TextResult]  # per text, in request order
    abstention: Threshold | None = None  # the head's threshold (None: published before abstention)


def checked_texts(texts: Sequence[str]) -> list[str]:
    """The texts NFC-normalised and stripped (as fcl-data read the training texts), within their bounds."""
    n = len(texts)
    if not 1 <= n <= wire.MAX_CLASSIFY_TEXTS:
        raise InvalidArgument(
            f"texts must hold 1-{wire.MAX_CLASSIFY_TEXTS} texts per call, not {n}"
            + (f"; split them into calls of at most {wire.MAX_CLASSIFY_TEXTS}" if n else "")
        )
    out = []
    for i, text in enumerate(texts):
        if len(text) > wire.CLASSIFY_TEXT_MAX_CHARS:
            raise InvalidArgument(
                f"text {i} is {len(text)} characters, over the limit of {wire.CLASSIFY_TEXT_MAX_CHARS} "
                f"(Unicode code points); shorten it (the FM reads only its first few hundred tokens): "
                f"{quoted(text)}"
            )
        problem = text_problem(text)
        if problem is not None:
            raise InvalidArgument(f"text {i} {problem}")
        normal = normalize_text(text)
        if not normal:
            raise InvalidArgument(
                f"text {i} is empty (or only whitespace); send 1-{wire.CLASSIFY_TEXT_MAX_CHARS} characters"
            )
        out.append(normal)
    return out


def checked_top_k(top_k: int) -> int:
    if not 0 <= top_k <= wire.CLASSIFY_TOP_K_MAX:
        raise InvalidArgument(
            f"top_k must be >= 0 and <= {wire.CLASSIFY_TOP_K_MAX} (0: {wire.CLASSIFY_DEFAULT_TOP_K}), "
            f"not {top_k}"
        )
    return top_k or wire.CLASSIFY_DEFAULT_TOP_K


def head_owner(principal: Principal, scope: str, client_id: str) -> str:
    """Whose head of `scope` the caller may use ("" for the global head); PermissionDenied otherwise.

    The global head is admin-only (as for GetKnowledge): it holds every client's labels, so its answers
    would show one client what the others taught it. A client uses its own personalised head only.
    """
    if scope == GLOBAL:
        if not principal.is_admin:
            raise PermissionDenied(
                "the global head is for admin tokens only; a client token classifies with its own "
                "personalised head (scope HEAD_SCOPE_PERSONAL)"
            )
        return ""
    owner = client_id or principal.name
    if owner != principal.name and not principal.is_admin:
        raise PermissionDenied(
            f"a client can classify only with its own personalised head; leave client_id empty, not {owner!r}"
        )
    return owner


def _no_head_yet(scope: str, owner: str) -> str:
    if scope == GLOBAL:
        return (
            "no global head yet: the server has distilled no upload so far; Classify answers once the "
            "first upload's job is DONE"
        )
    return (
        f"client {owner!r} has no personalised head yet: it is made when that client's first upload has "
        "been distilled (its job DONE); until then classify on the edge (fcl-client predict)"
    )


def score_features(head: Head, features: torch.Tensor, top_k: int) -> list[TextResult]:
    """The head's top-k labels per feature row, and its out-of-scope verdict where it has a threshold."""
    logits = head.model(features)
    probs = torch.softmax(logits, dim=1)
    values, index = probs.topk(min(top_k, probs.shape[1]), dim=1)
    threshold = head.abstention
    out = abstains(logits, threshold).tolist()
    conf = confidence(logits, threshold.score).tolist() if threshold else [0.0] * len(out)
    return [
        TextResult(
            [LabelScore(head.labels[int(i)], float(v)) for v, i in zip(row_v, row_i, strict=True)], o, c
        )
        for row_v, row_i, o, c in zip(values.tolist(), index.tolist(), out, conf, strict=True)
    ]


class HeadCache:
    """Decoded heads by (scope, owner), each with the version it is: a call whose head is cached reads
    no blob, and a newer version (published by any process: the database says) replaces the old one."""

    def __init__(self, blobs: BlobStore, max_bytes: int = HEAD_CACHE_BYTES) -> None:
        self.blobs = blobs
        self.max_bytes = max_bytes
        self.loads = 0  # heads decoded from their blobs so far
        self._heads: OrderedDict[tuple[str, str], tuple[HeadVersion, Head, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, found: HeadVersion) -> Head:
        key = (found.scope, found.client_id)
        with self._lock:
            cached = self._heads.get(key)
            if cached is not None and cached[0].blob == found.blob:
                self._heads.move_to_end(key)
                return cached[1]
        head = self._load(found)  # outside the lock: other heads are served meanwhile
        size = sum(p.numel() * p.element_size() for p in head.model.parameters())
        with self._lock:
            self.loads += 1
            cached = self._heads.get(key)
            if cached is None or cached[0].version <= found.version:  # never back to an older version
                self._heads[key] = (found, head, size)
                self._heads.move_to_end(key)
            self._evict(keep=key)
        return head

    def _load(self, found: HeadVersion) -> Head:
        try:
            pkg = decode_package(self.blobs.read(found.blob))
        except (OSError, PackageError) as exc:  # the server's own blob: a broken store, not the caller
            raise RuntimeError(f"{found.scope} head v{found.version} cannot be read: {exc}") from exc
        log.info(
            "%s head v%d%s loaded for Classify (%d labels)",
            found.scope,
            found.version,
            f" of {found.client_id}" if found.client_id else "",
            len(pkg.labels),
        )
        if pkg.abstention is None:
            log.info(
                "%s head v%d has no abstention threshold: it never answers out_of_scope",
                found.scope,
                found.version,
            )
        return Head(pkg.build(), list(pkg.labels), pkg.abstention)

    def _evict(self, keep: tuple[str, str]) -> None:
        total = sum(size for _, _, size in self._heads.values())
        for key in list(self._heads):
            if total <= self.max_bytes:
                return
            if key != keep:
                total -= self._heads.pop(key)[2]


class Classifier:
    """Classify's domain: checks a query, finds and caches its head, encodes and scores on one thread."""

    def __init__(self, state: State, blobs: BlobStore, fm_host: FMHost, max_calls: int = MAX_CALLS) -> None:
        self.state = state
        self.fm_host = fm_host
        self.heads = HeadCache(blobs)
        self.max_calls = max_calls
        self.executor = futures.ThreadPoolExecutor(1, thread_name_prefix="fcl-classify")
        self._calls = 0
        self._calls_lock = threading.Lock()
        self._fm: FoundationModel | None = None  # made on the encode thread, which alone uses it

    @property
    def calls(self) -> int:
        """Calls admitted now (encoding or waiting for the encoder)."""
        return self._calls

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of `max_calls` places, or refuse the call at once (RESOURCE_EXHAUSTED)."""
        with self._calls_lock:
            if self._calls >= self.max_calls:
                raise ResourceExhausted(
                    f"{self._calls} Classify calls are in progress, the most this server admits "
                    f"(--max-classify-calls {self.max_calls}); retry with backoff, or send more texts per "
                    "call"
                )
            self._calls += 1
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls -= 1

    def prepare(self, principal: Principal, query: ClassifyQuery) -> Prepared:
        """Check the query, and find the head that answers it (the latest version, decoded once)."""
        texts = checked_texts(query.texts)
        top_k = checked_top_k(query.top_k)
        if query.client_id and not wire.ID_RE.match(query.client_id):
            raise InvalidArgument(
                f"client_id must be empty or 1-{wire.ID_MAX_CHARS} letters, digits, '_', '.' or '-', "
                f"starting with a letter or digit; got {quoted(query.client_id)}"
            )
        if query.scope == PERSONAL and principal.is_admin and not query.client_id:
            raise InvalidArgument(
                "an admin token has no personalised head: name the client (client_id), or classify with "
                "the global head (scope HEAD_SCOPE_GLOBAL)"
            )
        owner = head_owner(principal, query.scope, query.client_id)
        found = self.state.head(query.scope, owner)
        if found is None:
            raise FailedPrecondition(_no_head_yet(query.scope, owner))
        return Prepared(found, self.heads.get(found), texts, top_k)

    @torch.inference_mode()
    def predict(self, prepared: Prepared) -> list[TextResult]:
        """Encode with the server's FM and score with the head; runs on `executor` (one call at a time)."""
        features = self._encoder().encode(prepared.texts, batch_size=ENCODE_BATCH)
        return score_features(prepared.head, features, prepared.top_k)

    def _encoder(self) -> FoundationModel:
        """The server's FM (the same weights and encoding) with a tokenizer of its own: a Hugging Face fast
        tokenizer is not safe to share between threads, and the worker encodes the public corpus with
        the FM's own at the same time."""
        if self._fm is None:
            fm = copy.copy(self.fm_host.fm)
            fm.tokenizer = copy.deepcopy(fm.tokenizer)
            self._fm = fm
        return self._fm

    def close(self) -> None:
        self.executor.shutdown(wait=True)
