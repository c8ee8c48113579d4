"""The stack's local S3: moto's server, plus the presigned-URL check that moto leaves out.

moto accepts any presigned URL without verifying it (a PUT with another Content-Type, a
tampered signature or an expired URL all succeed), so nothing could show that the URLs the
API hands out bind what they promise.  This wraps moto's WSGI application: a request whose
query string carries ``X-Amz-Signature`` is checked the way S3 checks it, in order:

1. The credential names the one access key this server knows (``S3_ACCESS_KEY_ID``).
2. The URL is not expired (``X-Amz-Date`` + ``X-Amz-Expires`` against the wall clock).
3. The SigV4 signature, recomputed from the request as received (method, raw path, query
   without the signature, the signed headers' values, ``UNSIGNED-PAYLOAD``), matches.

Any failure is S3's own 403 XML error.  Requests signed in the Authorization header pass
through to moto unchanged.  The algorithm is written from AWS's "Signature Version 4"
documentation with the standard library only, independently of the botocore signer the
application uses.  Run with the stack's own venv (``scripts/stack.sh up s3``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple

ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
EXPIRES_MAX_S = 7 * 24 * 3600
CLOCK_SKEW_MAX_S = 15 * 60

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
App = Callable[[Environ, StartResponse], Iterable[bytes]]


class Refused(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _query_pairs(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for part in raw_query.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def _header(environ: Environ, name: str) -> str:
    if name == "content-type":
        value = environ.get("CONTENT_TYPE", "")
    elif name == "content-length":
        value = environ.get("CONTENT_LENGTH", "")
    else:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"), "")
    return " ".join(str(value).split())


def expected_signature(environ: Environ, params: dict[str, str], secret: str) -> str:
    """Step 3: the signature S3 would compute for this request."""
    path = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "/").split("?", 1)[0]
    query = sorted(
        (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
        for k, v in _query_pairs(str(environ.get("QUERY_STRING", "")))
        if k != "X-Amz-Signature"
    )
    signed = params["X-Amz-SignedHeaders"].split(";")
    canonical_request = "\n".join(
        [
            str(environ["REQUEST_METHOD"]).upper(),
            path,
            "&".join(f"{k}={v}" for k, v in query),
            "".join(f"{h}:{_header(environ, h)}\n" for h in signed),
            ";".join(signed),
            params.get("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD"),
        ]
    )
    scope = params["X-Amz-Credential"].split("/", 1)[1]
    date, region, service, _ = scope.split("/")
    string_to_sign = "\n".join(
        [
            ALGORITHM,
            params["X-Amz-Date"],
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = _hmac(("AWS4" + secret).encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def check_presigned(environ: Environ, access_key_id: str, secret: str, now: datetime) -> None:
    """Steps 1-3 for a query-signed request; raises :class:`Refused`."""
    params = dict(_query_pairs(str(environ.get("QUERY_STRING", ""))))
    required = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires")
    if params.get("X-Amz-Algorithm") != ALGORITHM or not all(params.get(p) for p in required):
        raise Refused("AuthorizationQueryParametersError", "malformed SigV4 query parameters")
    credential = params["X-Amz-Credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request":
        raise Refused("AuthorizationQueryParametersError", "malformed X-Amz-Credential")
    if credential[0] != access_key_id:
        raise Refused("InvalidAccessKeyId", "the access key id does not exist")
    try:
        signed_at = datetime.strptime(params["X-Amz-Date"], AMZ_DATE_FORMAT).replace(tzinfo=UTC)
        expires_s = int(params["X-Amz-Expires"])
    except ValueError:
        raise Refused("AuthorizationQueryParametersError", "bad X-Amz-Date/Expires") from None
    if not 1 <= expires_s <= EXPIRES_MAX_S:
        raise Refused("AuthorizationQueryParametersError", "X-Amz-Expires out of range")
    if now > signed_at + timedelta(seconds=expires_s):
        raise Refused("AccessDenied", "Request has expired")
    if signed_at > now + timedelta(seconds=CLOCK_SKEW_MAX_S):
        raise Refused("AccessDenied", "Request is not yet valid")
    if not hmac.compare_digest(
        expected_signature(environ, params, secret), params.get("X-Amz-Signature", "")
    ):
        raise Refused(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided.",
        )


def verifying(app: App, access_key_id: str, secret: str) -> App:
    """``app`` behind the presigned-URL check of the module docstring."""

    def wrapped(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if "X-Amz-Signature=" in str(environ.get("QUERY_STRING", "")):
            try:
                check_presigned(environ, access_key_id, secret, datetime.now(UTC))
            except Refused as refused:
                body = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{refused.code}</Code>"
                    f"<Message>{escape(refused.message)}</Message>"
                    f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>"
                ).encode()
                start_response(
                    "403 Forbidden",
                    [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                )
                return [body]
        return app(environ, start_response)

    return wrapped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4566)
    args = parser.parse_args(argv)
    access_key_id = os.environ.get("S3_ACCESS_KEY_ID", "dev-access-key")
    secret = os.environ.get("S3_SECRET_ACCESS_KEY", "dev-secret-key")
    os.environ.setdefault("MOTO_PORT", str(args.port))  # what moto puts in URLs it returns
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    moto_app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host,
        args.port,
        verifying(moto_app, access_key_id, secret),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
