"""ASGI middleware for `vllm serve --middleware require_api_key.RequireApiKey`: every HTTP and
websocket path needs `Authorization: Bearer $VLLM_API_KEY`, except the kubelet's /health probe and
Prometheus' /metrics scrape.

vLLM 0.32's own key (`--api-key` / VLLM_API_KEY) guards only /v1, /v2, /inference and /cohere:
/invocations (SageMaker's route to the same chat and completions), /generative_scoring,
/tokenize and others answer without it. This closes them. deploy/Dockerfile installs this file
next to madakv_vllm; docs/deploy.md explains the setup.
"""
from __future__ import annotations

import hashlib
import hmac
import os

# Probes and scrapers send no key; neither path runs the model.
OPEN_PATHS = frozenset({"/health", "/metrics"})


def _key_digest() -> bytes:
    key = os.environ.get("VLLM_API_KEY", "").strip()
    if not key:
        # An empty Secret value must not turn into an open server.
        raise RuntimeError("VLLM_API_KEY is empty or unset: refusing to serve without an API key")
    return hashlib.sha256(key.encode()).digest()


# Checked at import, which `vllm serve` does before it listens: a missing key stops the server
# instead of leaving it up with every request failing.
_key_digest()


class RequireApiKey:
    def __init__(self, app):
        self.app = app
        self.digest = _key_digest()

    def authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                # Digests compared in constant time: neither the key nor its length leaks.
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    hashlib.sha256(token.strip()).digest(), self.digest)
        return False

    async def __call__(self, scope, receive, send):
        # OPTIONS is a browser's CORS preflight, which carries no key and runs nothing.
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in OPEN_PATHS and not self.authorized(scope):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                else:
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"www-authenticate", b"Bearer")]})
                    await send({"type": "http.response.body", "body": b'{"error":"Unauthorized"}'})
                return
        await self.app(scope, receive, send)
