"""Schemathesis hooks for the run in .ci/run: requests as the gateway's clients send them.

- Positive cases carry timestamps inside the window the gateway takes (30 days back, 5 minutes ahead of its
  clock), which JSON Schema cannot express: without this nearly every generated update would stop at a 422,
  and the accept path (the log, the queue, `?ack=commit`, the writers) would go untested.
- NDJSON bodies (text in the OpenAPI document) are lines of JSON objects, and go out as UTF-8: schemathesis
  has no generator or serializer of its own for `application/x-ndjson`.
- A body whose generated `Content-Encoding` is `gzip` or `x-gzip` is gzipped, as the header says; sent plain,
  every such request would only show that a body which does not decompress is refused.
"""

import gzip
import json
import time
from datetime import datetime, timezone

import schemathesis
from hypothesis import strategies as st

GZIP_ENCODINGS = ("gzip", "x-gzip")
TIMESTAMP_FIELDS = ("recorded_at", "polled_at")

_json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
_json_objects = st.dictionaries(st.text(max_size=12), _json_scalars | st.text(max_size=24), max_size=6)
schemathesis.openapi.media_type(
    "application/x-ndjson",
    st.lists(_json_objects.map(json.dumps), min_size=1, max_size=5).map(lambda lines: "\n".join(lines).encode()),
)


def _now_like(value):
    """Now, in the form the generator chose: integer Unix milliseconds or RFC 3339 text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return int(time.time() * 1000)
    return datetime.now(timezone.utc).isoformat()


@schemathesis.hook
def map_case(context, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    updates = case.body if isinstance(case.body, list) else [case.body]
    for update in updates:
        if isinstance(update, dict):
            for field in TIMESTAMP_FIELDS:
                if field in update:
                    update[field] = _now_like(update[field])
    return case


def _as_sent(ctx, data: bytes) -> bytes:
    headers = ctx.case.headers or {}
    encoding = next((str(v) for k, v in headers.items() if k.lower() == "content-encoding"), "")
    return gzip.compress(data) if encoding.strip().lower() in GZIP_ENCODINGS else data


@schemathesis.serializer("application/json")
def json_body(ctx, value):
    if isinstance(value, bytes):
        data = value
    else:
        # As `requests` sends JSON: no NaN or Infinity, which are not JSON.
        data = json.dumps(value, allow_nan=False).encode("utf-8")
    return _as_sent(ctx, data)


@schemathesis.serializer("application/x-ndjson")
def ndjson_body(ctx, value):
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogatepass")
    return _as_sent(ctx, data)
