"""OIDC sign-in: the authorization code flow with PKCE, state and nonce.

`begin` stores what the callback needs (the state, nonce and PKCE verifier, bound to the
browser by a cookie) in PostgreSQL, not in the process, and sends the browser to the issuer.
`complete` takes the issuer's answer, spends that sign-in once, exchanges the code for tokens
and validates the ID token with joserfc against the keys the issuer's discovery document names:
signature, issuer, audience (and `azp` when there are several), expiry, issue time and nonce.
The principal is the one a configured claim names, in the configured tenant (or a claim's), and
must exist in Stead: its roles are Stead's, never the token's.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

from stead.config import Settings
from stead.service.errors import Forbidden, NotFound, Unauthorized, Unavailable
from stead.store import sessions
from stead.store.db import Pool
from stead.store.sessions import PendingLogin

BINDING_COOKIE = "stead_oidc"
LOGIN_LIFETIME = timedelta(minutes=10)
# Asymmetric signatures only: "none" is no signature, and HS* would make the client secret a
# signing key.
SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384")
_CACHE_SECONDS = 300
_LEEWAY_SECONDS = 60
_TIMEOUT = httpx.Timeout(10.0)


@dataclass(frozen=True)
class Metadata:
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    algorithms: tuple[str, ...]
    basic_auth: bool


@dataclass(frozen=True)
class Identity:
    tenant: str
    principal_id: str


class OidcClient:
    """One per API process; it caches the issuer's discovery document and keys, nothing of
    anyone's sign-in."""

    def __init__(self, settings: Settings) -> None:
        if not settings.oidc_issuer or not settings.oidc_client_id:
            raise NotFound("OIDC sign-in is not configured")
        self.settings = settings
        self.issuer = settings.oidc_issuer.rstrip("/")
        self.client_id = settings.oidc_client_id
        self._metadata: tuple[float, Metadata] | None = None
        self._keys: tuple[float, KeySet] | None = None

    # --- the issuer's documents ------------------------------------------------------------

    async def _get(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT) as http:
                response = await http.get(url)
            response.raise_for_status()
            found = response.json()
        except (httpx.HTTPError, ValueError):
            raise Unavailable("the identity provider did not answer; try again shortly") from None
        if not isinstance(found, dict):
            raise Unavailable("the identity provider sent something that is not JSON")
        return found

    async def metadata(self) -> Metadata:
        if self._metadata and self._metadata[0] > time.monotonic():
            return self._metadata[1]
        doc = await self._get(f"{self.issuer}/.well-known/openid-configuration")
        if str(doc.get("issuer", "")).rstrip("/") != self.issuer:
            raise Unavailable("the identity provider's discovery document names another issuer")
        offered = doc.get("id_token_signing_alg_values_supported") or ["RS256"]
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        try:
            meta = Metadata(
                authorization_endpoint=str(doc["authorization_endpoint"]),
                token_endpoint=str(doc["token_endpoint"]),
                jwks_uri=str(doc["jwks_uri"]),
                algorithms=tuple(a for a in SIGNING_ALGORITHMS if a in offered),
                basic_auth="client_secret_basic" in methods or "client_secret_post" not in methods,
            )
        except KeyError as exc:
            raise Unavailable(f"the identity provider's discovery document lacks {exc}") from None
        self._metadata = (time.monotonic() + _CACHE_SECONDS, meta)
        return meta

    async def keys(self, meta: Metadata, *, fresh: bool = False) -> KeySet:
        if not fresh and self._keys and self._keys[0] > time.monotonic():
            return self._keys[1]
        try:
            keys = KeySet.import_key_set(await self._get(meta.jwks_uri))  # type: ignore[arg-type]  # a JWKS document, checked by joserfc
        except (JoseError, ValueError, TypeError):
            raise Unavailable("the identity provider's keys could not be read") from None
        self._keys = (time.monotonic() + _CACHE_SECONDS, keys)
        return keys

    # --- the flow --------------------------------------------------------------------------

    async def begin(self, pool: Pool, return_to: str) -> tuple[str, str]:
        """Where to send the browser, and the value of the cookie that binds the sign-in to it."""
        meta = await self.metadata()
        state, binding, nonce = (secrets.token_urlsafe(32) for _ in range(3))
        verifier = secrets.token_urlsafe(48)
        async with pool.acquire() as conn:
            await sessions.begin_login(
                conn, state, binding, PendingLogin(nonce, verifier, return_to), LOGIN_LIFETIME
            )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.settings.oidc_callback_url,
                "scope": self.settings.oidc_scopes,
                "state": state,
                "nonce": nonce,
                "code_challenge": _challenge(verifier),
                "code_challenge_method": "S256",
            }
        )
        return f"{meta.authorization_endpoint}?{query}", binding

    async def complete(
        self, pool: Pool, state: str, code: str, binding: str | None
    ) -> tuple[Identity, str]:
        """The identity the issuer vouched for, and where the browser was going."""
        async with pool.acquire() as conn:
            login = await sessions.finish_login(conn, state, binding or "")
        if login is None:
            raise Unauthorized(
                "this sign-in was not started in this browser, was used already or expired;"
                " sign in again"
            )
        meta = await self.metadata()
        id_token = await self._exchange(meta, code, login.code_verifier)
        claims = await self._validate(meta, id_token, login.nonce)
        return self._identity(claims), login.return_to

    async def _exchange(self, meta: Metadata, code: str, verifier: str) -> str:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.settings.oidc_callback_url,
            "code_verifier": verifier,
            "client_id": self.client_id,
        }
        auth = httpx.Auth()  # the base class sends the request as it is
        secret = self.settings.oidc_client_secret
        if secret is not None and meta.basic_auth:
            auth = httpx.BasicAuth(self.client_id, secret.get_secret_value())
        elif secret is not None:
            form["client_secret"] = secret.get_secret_value()
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT) as http:
                response = await http.post(meta.token_endpoint, data=form, auth=auth)
            body = response.json()
        except (httpx.HTTPError, ValueError):
            raise Unavailable("the identity provider did not answer; try again shortly") from None
        if response.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            # Only the error's code: its description may echo what was sent.
            raise Unauthorized(f"the identity provider refused the sign-in ({error or 'error'})")
        token = body.get("id_token")
        if not isinstance(token, str):
            raise Unauthorized("the identity provider sent no ID token")
        return token

    async def _validate(self, meta: Metadata, id_token: str, nonce: str) -> dict[str, Any]:
        keys = await self.keys(meta)
        try:
            try:
                token = jwt.decode(id_token, keys, algorithms=list(meta.algorithms))
            except InvalidKeyIdError:
                # The issuer rotated its keys since we fetched them.
                keys = await self.keys(meta, fresh=True)
                token = jwt.decode(id_token, keys, algorithms=list(meta.algorithms))
            jwt.JWTClaimsRegistry(
                leeway=_LEEWAY_SECONDS,
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.client_id},
                exp={"essential": True},
                iat={"essential": True},
                sub={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except JoseError as exc:
            raise Unauthorized(
                f"the identity provider's ID token is not valid ({exc.error})"
            ) from None
        claims = token.claims
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != self.client_id:
            raise Unauthorized("the identity provider's ID token is not valid (azp)")
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        s = self.settings
        tenant = s.oidc_tenant or claims.get(s.oidc_tenant_claim)
        principal = claims.get(s.oidc_principal_claim)
        if not isinstance(tenant, str) or not tenant:
            raise Forbidden(f"the ID token names no tenant (claim {s.oidc_tenant_claim!r})")
        if not isinstance(principal, str) or not principal:
            raise Forbidden(f"the ID token names no user (claim {s.oidc_principal_claim!r})")
        return Identity(tenant, principal)


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
