"""Every bound on what a request may carry, in one place.

The server validates each field against these (fcl_server/service.py, common/package.py) and refuses
a value beyond its bound with INVALID_ARGUMENT (RESOURCE_EXHAUSTED for sizes). `PROTO_BOUNDS` is the
text of the `// bound:` comment of each request field in protos/fcl/v1/fcl.proto; tests/test_bounds.py
checks that the two agree, so the contract cannot drift from the code. Limits an operator tunes
(upload size, rates, quotas) are `ServerLimits` in fcl_server/service.py, not here.
"""

from __future__ import annotations

import re

# -- ids and digests --------------------------------------------------------------------------------
ID_MAX_CHARS = 128  # client_id, upload_id, task_key: 1..128 chars of ID_CHARS, the first a letter or digit
ID_CHARS = "[A-Za-z0-9_.-]"
# \A..\Z, not ^..$: '$' also matches before a trailing newline, which would let "x\n" through
ID_RE = re.compile(rf"\A[A-Za-z0-9][A-Za-z0-9_.\-]{{0,{ID_MAX_CHARS - 1}}}\Z")
SHA256_HEX_CHARS = 64  # fm_digest, sha256, archive_sha256: a sha256 digest in lowercase hex
SHA_RE = re.compile(rf"\A[0-9a-f]{{{SHA256_HEX_CHARS}}}\Z")

# -- Register ---------------------------------------------------------------------------------------
CLIENT_VERSION_MAX_CHARS = 64  # RegisterRequest.client_version
MODEL_SPEC_JSON_MAX_BYTES = 4096  # RegisterRequest.model_spec_json, UTF-8 bytes (stored per client)

# -- uploads ----------------------------------------------------------------------------------------
TASK_INDEX_MAX = 100_000  # UploadHeader.task_index, ReportMetricsRequest.task_index: 0..TASK_INDEX_MAX
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # UploadKnowledgeRequest.chunk (ServerLimits.max_chunk_bytes default)

# -- knowledge packages (common/package.py validates them) ------------------------------------------
MAX_LABELS = 10_000  # label names per package (PackageLimits/ServerLimits.max_labels default)
LABEL_MAX_CHARS = 128  # one label name: 1..128 Unicode characters (code points), see common/labels.py
# One character's longest form in a package's metadata: json.dumps with ASCII escapes (packages before
# 0.2 were written so) spells an astral character such as an emoji as a surrogate pair, "\ud83d\ude00",
# 12 bytes; UTF-8 itself needs at most 4, and '"' or '\' become 2 bytes in JSON.
JSON_CHAR_MAX_BYTES = 12
# All of a package's string metadata (keys and values, UTF-8): MAX_LABELS labels of LABEL_MAX_CHARS
# characters listed twice (`labels`, `stats_labels`), each character at its longest, with quotes and
# commas, plus MAX_LABELS counts of up to 11 digits and 64 KiB for spec, digest and the rest (30,985,536
# bytes). So any valid set of labels, CJK or emoji included, fits; anything beyond is refused unparsed.
METADATA_MAX_BYTES = 2 * MAX_LABELS * (LABEL_MAX_CHARS * JSON_CHAR_MAX_BYTES + 4) + MAX_LABELS * 12 + 65536
MAX_FEATURE_DIM = 8192  # a package's feature_dim (PackageLimits.max_feature_dim default)
PACKAGE_MAX_BYTES = 256 * 1024 * 1024  # PackageLimits.max_bytes default (the server uses max_upload_bytes)

# -- ReportMetrics ----------------------------------------------------------------------------------
MAX_METRICS = 256  # metrics per ReportMetrics call (ServerLimits.max_metrics default)
METRIC_NAME_MAX_CHARS = 64  # a metric name: 1..64 chars of [A-Za-z0-9_./-], the first a letter or digit
METRIC_NAME_RE = re.compile(rf"\A[A-Za-z0-9][A-Za-z0-9_./\-]{{0,{METRIC_NAME_MAX_CHARS - 1}}}\Z")

# -- GetStatus --------------------------------------------------------------------------------------
MAX_STATUS_JOBS = 10_000  # GetStatusRequest.max_jobs: 0..MAX_STATUS_JOBS (about 1 MB of JobStatus)
DEFAULT_STATUS_JOBS = 100  # max_jobs = 0 lists this many

# -- Classify -------------------------------------------------------------------------------------
MAX_CLASSIFY_TEXTS = 256  # ClassifyRequest.texts: 1..MAX_CLASSIFY_TEXTS per call
# one text, in characters (code points) as labels are counted; an FM reads at most a few hundred tokens
# (max_length, 128-512), which 2048 characters of ordinary text exceed, so nothing it could use is cut.
# At 4 UTF-8 bytes a character a full request is at most 2.1 MB: under the server's receive cap (one
# upload chunk, 4 MiB) and the 4 MiB default of gRPC clients, grpcurl included
CLASSIFY_TEXT_MAX_CHARS = 2048
# ClassifyRequest.top_k: 0..CLASSIFY_TOP_K_MAX (0: CLASSIFY_DEFAULT_TOP_K). A full answer, 256 texts x
# 20 labels of at most 128 characters (512 bytes) each, is under 2.8 MB with its framing: it fits the
# 4 MiB a gRPC client accepts by default, however long the labels
CLASSIFY_TOP_K_MAX = 20
CLASSIFY_DEFAULT_TOP_K = 5

# -- error messages ---------------------------------------------------------------------------------
QUOTE_CHARS = 32  # an error message quotes at most this much of an offending value


def quoted(value: str | bytes, limit: int = QUOTE_CHARS) -> str:
    """repr of `value`, cut to its first `limit` chars (and its length) when longer: safe in a message.

    Never put unbounded input into a status message whole: a long one exceeds the client's metadata
    limit, and the client then sees a transport error instead of the real one.
    """
    if len(value) <= limit:
        return repr(value)
    unit = "bytes" if isinstance(value, bytes) else "chars"
    return f"{value[:limit]!r}...({len(value)} {unit})"


# -- the bounds as the .proto states them -----------------------------------------------------------
_ID = f"1-{ID_MAX_CHARS} chars of {ID_CHARS}, the first a letter or digit"
_SHA = f"{SHA256_HEX_CHARS} lowercase hex digits"
_TASK_INDEX = f"0-{TASK_INDEX_MAX}"

# "Message.field" → the text after `// bound: ` above that field in fcl.proto (every string, bytes,
# repeated and map field of every request, and the integers that have a range)
PROTO_BOUNDS: dict[str, str] = {
    "RegisterRequest.client_id": f"empty, or {_ID}",
    "RegisterRequest.fm_digest": f"empty, or {_SHA}",
    "RegisterRequest.client_version": f"at most {CLIENT_VERSION_MAX_CHARS} chars",
    "RegisterRequest.model_spec_json": f"at most {MODEL_SPEC_JSON_MAX_BYTES} bytes (UTF-8)",
    "GetFoundationModelRequest.offset": "0 to FoundationModelInfo.archive_size",
    "GetFoundationModelRequest.archive_sha256": f"empty, or {_SHA}",
    "UploadKnowledgeRequest.chunk": f"at most {MAX_CHUNK_BYTES} bytes per message",
    "UploadHeader.upload_id": _ID,
    "UploadHeader.task_key": _ID,
    "UploadHeader.task_index": _TASK_INDEX,
    "UploadHeader.fm_digest": _SHA,
    "UploadHeader.size": "1 to the server's max_upload_bytes (default 64 MiB), within the client's quota",
    "UploadHeader.sha256": f"{SHA256_HEX_CHARS} hex digits",
    "UploadHeader.offset": "0 to size",
    "GetUploadStatusRequest.upload_id": _ID,
    "GetKnowledgeRequest.version": ">= 0",
    "GetKnowledgeRequest.client_id": f"empty, or {_ID}",
    "ReportMetricsRequest.task_key": _ID,
    "ReportMetricsRequest.task_index": _TASK_INDEX,
    "ReportMetricsRequest.metrics": (
        f"at most {MAX_METRICS} entries; names 1-{METRIC_NAME_MAX_CHARS} chars of [A-Za-z0-9_./-], "
        "the first a letter or digit; values finite"
    ),
    "GetStatusRequest.max_jobs": f"0-{MAX_STATUS_JOBS}",
    "ClassifyRequest.texts": (
        f"1-{MAX_CLASSIFY_TEXTS} texts, each 1-{CLASSIFY_TEXT_MAX_CHARS} chars (Unicode code points)"
    ),
    "ClassifyRequest.top_k": f"0-{CLASSIFY_TOP_K_MAX}",
    "ClassifyRequest.client_id": f"empty, or {_ID}",
}
