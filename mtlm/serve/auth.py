"""Who may call the server: API keys (`Authorization: Bearer <key>`, RFC 6750) and TLS files.

The interface follows text-embeddings-inference and vLLM (`--api-key`): with keys set, every `/v1/*`
request needs one of them, or gets 401 with `WWW-Authenticate: Bearer` and no hint of which keys exist.
`/health` and `/ready` stay open (load balancers probe them); `/metrics` and the OpenAPI docs are open only
with `open_metrics` / `open_docs`. Anything else (an unknown path) is protected too.

Keys are kept only as SHA-256 digests: the comparison is `hmac.compare_digest` over fixed-length digests
against every key (no early exit, so the time taken does not depend on which key or how much of it
matched), and the digests, not the keys, travel to `--workers N` processes (`to_env` / `from_env`). The
check is part of the FastAPI app `create_app` builds, so every deployment of that app (uvicorn workers, a
Ray Serve ingress wrapping it) enforces the same keys. No key ever goes into a log line, a metric label or
an error message; rejections are counted by reason: missing, malformed, invalid.

This module imports only the standard library (the CLI imports `AccessConfigError` without the serve
extra)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mtlm.serve")

ENV_KEYS = "MTLM_API_KEYS"            # comma-separated keys (users set it)
ENV_AUTH = "MTLM_SERVE_AUTH"          # key digests + open flags as JSON (set by serve() for its workers)
OPEN_PATHS = frozenset({"/health", "/ready"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
REASONS = ("missing", "malformed", "invalid")


class AccessConfigError(ValueError):
    """A bad --api-key / --api-key-file / MTLM_API_KEYS / --ssl-certfile / --ssl-keyfile setting. The
    message names the source (file and line) but never the key itself."""


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _check_key(key: str, where: str) -> str:
    """A key must be printable ASCII without spaces (it travels in an HTTP header as-is)."""
    if not key:
        raise AccessConfigError(f"{where}: an empty API key")
    if not all("!" <= c <= "~" for c in key):
        raise AccessConfigError(f"{where}: an API key may hold only printable ASCII characters, no spaces")
    return key


def read_keys(cli_keys: list[str] | None = None, key_file: str | Path | None = None,
              environ: dict[str, str] | None = None) -> list[str]:
    """Every API key from `--api-key` (repeatable), `--api-key-file` (one key per line; blank lines and
    lines starting with '#' are skipped) and MTLM_API_KEYS (comma-separated), in that order, without
    duplicates. An empty result means: no authentication.

    Raises AccessConfigError naming the source (file and line) for an unreadable or keyless file or a key
    with spaces or non-ASCII characters."""
    environ = os.environ if environ is None else environ
    keys = [_check_key(k, f"--api-key (number {i + 1})") for i, k in enumerate(cli_keys or [])]
    if key_file is not None:
        try:
            lines = Path(key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise AccessConfigError(f"--api-key-file {key_file}: cannot read: {type(e).__name__}") from None
        found = [(n, line.strip()) for n, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise AccessConfigError(f"--api-key-file {key_file}: no keys (one key per line)")
        keys += [_check_key(k, f"--api-key-file {key_file}, line {n}") for n, k in found]
    raw = environ.get(ENV_KEYS, "")
    keys += [_check_key(k.strip(), f"{ENV_KEYS} (key {i + 1})") for i, k in enumerate(raw.split(",")) if k.strip()]
    return list(dict.fromkeys(keys))


@dataclass(frozen=True)
class APIKeys:
    """The keys a server accepts (as SHA-256 digests) and which extra paths stay open.

    `reject(path, authorization)` -> None when the request may pass, else the reason: "missing" (no
    Authorization header), "malformed" (not `Bearer <token>`), "invalid" (no key matches)."""

    digests: tuple[bytes, ...]
    open_metrics: bool = False
    open_docs: bool = False

    @classmethod
    def from_keys(cls, keys: list[str], open_metrics: bool = False, open_docs: bool = False) -> APIKeys:
        """Raises ValueError for an empty key list (no keys = no APIKeys object at all)."""
        if not keys:
            raise ValueError("APIKeys needs at least one key")
        return cls(tuple(_digest(k.encode("ascii")) for k in keys), open_metrics, open_docs)

    def protects(self, path: str) -> bool:
        """Whether `path` needs a key: everything except /health, /ready, the playground's static page (/,
        /playground/...: it asks for the key and sends it to /v1) and the opened /metrics, docs."""
        if path in OPEN_PATHS or path == "/" or path.startswith("/playground/"):   # static page: no model data
            return False
        if path == "/metrics":
            return not self.open_metrics
        if path in DOCS_PATHS:
            return not self.open_docs
        return True

    def reject(self, path: str, authorization: bytes | None) -> str | None:
        if not self.protects(path):
            return None
        if not authorization:
            return "missing"
        scheme, _, token = authorization.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return "malformed"
        presented, ok = _digest(token), 0
        for digest in self.digests:                 # every key, always: no early exit
            ok |= hmac.compare_digest(digest, presented)
        return None if ok else "invalid"

    def to_env(self) -> str:
        return json.dumps({"sha256": [d.hex() for d in self.digests], "open_metrics": self.open_metrics,
                           "open_docs": self.open_docs})

    @classmethod
    def from_env(cls, value: str | None) -> APIKeys | None:
        """The inverse of `to_env`; None for an unset / empty value (no keys)."""
        if not value:
            return None
        data = json.loads(value)
        return cls(tuple(bytes.fromhex(h) for h in data["sha256"]), bool(data["open_metrics"]),
                   bool(data["open_docs"]))


def www_authenticate(reason: str) -> str:
    """The WWW-Authenticate value of a 401 (RFC 6750 section 3: no error code when no credentials came)."""
    return 'Bearer realm="mtlm"' if reason == "missing" else 'Bearer realm="mtlm", error="invalid_token"'


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Load the certificate chain once up front, so a wrong path or a key that does not match the
    certificate is a clear error before the model loads (uvicorn loads them again in every worker).
    `keyfile` may be omitted when `certfile` holds the key too. Raises AccessConfigError."""
    if keyfile and not certfile:
        raise AccessConfigError("--ssl-keyfile needs --ssl-certfile")
    if not certfile:
        return
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not Path(path).is_file():
            raise AccessConfigError(f"{flag} {path}: no such file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as e:
        raise AccessConfigError(f"--ssl-certfile {certfile}" + (f" / --ssl-keyfile {keyfile}" if keyfile else "")
                                + f": cannot load the certificate and key ({e})") from None


def access_from_args(args) -> APIKeys | None:
    """`mtlm serve`'s access flags -> the APIKeys to enforce (None: no keys), after checking the TLS files.
    Logs how many keys guard what (never a key), or warns when `args.host` is beyond loopback without
    keys. args: host, port; optional api_keys, api_key_file, open_metrics, open_docs, ssl_certfile,
    ssl_keyfile (argparse). Raises AccessConfigError (`read_keys`, `check_tls`)."""
    keys = read_keys(getattr(args, "api_keys", None), getattr(args, "api_key_file", None))
    check_tls(getattr(args, "ssl_certfile", None), getattr(args, "ssl_keyfile", None))
    if not keys:
        if not is_loopback(args.host):
            log.warning("listening on %s without API keys: anyone who can reach port %d can use the model and "
                        "read /metrics. Add keys with --api-key-file PATH (one key per line) or "
                        "MTLM_API_KEYS=k1,k2 (or --api-key KEY, which shows in the process list)", args.host, args.port)
        return None
    api_keys = APIKeys.from_keys(keys, bool(getattr(args, "open_metrics", False)),
                                 bool(getattr(args, "open_docs", False)))
    log.info("API keys: %d; /v1/* needs 'Authorization: Bearer <key>'; /metrics %s, /docs %s; /health, /ready "
             "open", len(keys), "open" if api_keys.open_metrics else "needs a key",
             "open" if api_keys.open_docs else "needs a key")
    return api_keys
