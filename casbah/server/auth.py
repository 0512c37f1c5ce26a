"""Who is calling, and may they read or write this instance.

Identities come from, in order: a bearer token (`authorization: Bearer …`) that is
either a JWT (HS256 with a shared secret, RS256 with a JWKS file) or a static
token listed by its SHA-256 in the tokens file; the client certificate's subject
under mTLS; else the anonymous identity.  Each identity has scopes (`read`,
`write`; write implies read) and optionally a set of instances it is limited to.

Every denied call and every write is written to the `casbah.audit` log: who,
what, which instance, which digest.  A cache that anyone can write to can poison
every build that reads from it, so when any authentication method is configured,
anonymous clients get nothing unless `anonymous` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casbah.config import AuthConfig
from casbah.errors import InvalidArgument, PermissionDenied, Unauthenticated

audit = logging.getLogger("casbah.audit")

_SCOPES = {"read": frozenset({"read"}), "write": frozenset({"read", "write"})}


@dataclass(frozen=True)
class Identity:
    name: str
    scopes: frozenset[str]
    instances: frozenset[str] | None = None  # None: every instance
    authenticated: bool = False

    def allows(self, scope: str, instance: str) -> bool:
        return scope in self.scopes and (self.instances is None or instance in self.instances)


def _grant(spec: str, where: str) -> tuple[frozenset[str], frozenset[str] | None]:
    """`read|write [INSTANCE…]` → (scopes, instances or None)."""
    parts = spec.split()
    if not parts or parts[0] not in _SCOPES:
        raise InvalidArgument(f"{where}: want 'read|write [INSTANCE…]', got {spec!r}")
    instances = frozenset("" if p in ('""', "''") else p for p in parts[1:]) or None
    return _SCOPES[parts[0]], instances


def load_tokens(path: str) -> dict[str, Identity]:
    """The tokens file: `sha256:<hex of the token> read|write [INSTANCE…]` per line.

    Only hashes are stored, so the file can be read by anyone without leaking a
    credential.  `""` names the default (empty) instance.
    """
    tokens: dict[str, Identity] = {}
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, rest = line.partition(" ")
        where = f"{path}:{number}"
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise InvalidArgument(f"{where}: a token is written 'sha256:<64 hex>', got {digest!r}")
        scopes, instances = _grant(rest, where)
        hexdigest = digest[7:].lower()
        tokens[hexdigest] = Identity(f"token:{hexdigest[:12]}", scopes, instances, authenticated=True)
    return tokens


class JwtVerifier:
    """HS256 (`secret` or `secret-file`) and RS256 (`jwks` file) tokens; scopes from a claim.

    Config keys: `secret`/`secret-file`, `jwks`, `audience`, `issuer`, `scope-claim`
    (default `scope`: a space-separated string or a list containing `casbah:read`
    / `casbah:write` or plain `read` / `write`), `instances-claim` (default
    `casbah_instances`: a list; absent = every instance).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        import jwt

        self._jwt = jwt
        known = {"secret", "secret-file", "jwks", "audience", "issuer", "scope-claim", "instances-claim"}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise InvalidArgument(f"auth.jwt.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
        self.keys: dict[str, Any] = {}
        self.secret = spec.get("secret")
        if spec.get("secret-file"):
            self.secret = Path(spec["secret-file"]).read_text().strip()
        if spec.get("jwks"):
            jwks = json.loads(Path(spec["jwks"]).read_text())
            for key in jwks.get("keys", []):
                self.keys[key.get("kid", "")] = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))
        if not self.secret and not self.keys:
            raise InvalidArgument("auth.jwt needs 'secret', 'secret-file' or 'jwks'")
        self.audience = spec.get("audience")
        self.issuer = spec.get("issuer")
        self.scope_claim = spec.get("scope-claim", "scope")
        self.instances_claim = spec.get("instances-claim", "casbah_instances")

    def verify(self, token: str) -> Identity:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") == "HS256" and self.secret:
                key, algorithms = self.secret, ["HS256"]
            elif header.get("alg") == "RS256" and self.keys:
                key = self.keys.get(header.get("kid", "")) or next(iter(self.keys.values()))
                algorithms = ["RS256"]
            else:
                raise Unauthenticated(f"JWT algorithm {header.get('alg')!r} is not accepted")
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid JWT: {exc}") from None
        raw = claims.get(self.scope_claim, "")
        granted = set(raw.split() if isinstance(raw, str) else raw)
        scopes: frozenset[str] = frozenset()
        if granted & {"write", "casbah:write"}:
            scopes = _SCOPES["write"]
        elif granted & {"read", "casbah:read"}:
            scopes = _SCOPES["read"]
        instances = claims.get(self.instances_claim)
        return Identity(f"jwt:{claims.get('sub', '?')}", scopes,
                        frozenset(instances) if isinstance(instances, list) else None, authenticated=True)


class Authorizer:
    def __init__(self, config: AuthConfig) -> None:
        self.tokens = load_tokens(config.tokens) if config.tokens else {}
        self.jwt = JwtVerifier(config.jwt) if config.jwt else None
        self.subjects = {
            subject: Identity(f"mtls:{subject}", *_grant(spec, f"auth.mtls-subjects.{subject}"), authenticated=True)
            for subject, spec in config.mtls_subjects.items()
        }
        configured = bool(config.tokens or config.jwt or config.mtls_subjects)
        anonymous = config.anonymous or ("none" if configured else "read-write")
        scopes = {"read-write": _SCOPES["write"], "read-only": _SCOPES["read"], "none": frozenset()}[anonymous]
        self.anonymous = Identity("anonymous", scopes)
        self.authenticated_ac_writers = config.action_cache_writers == "authenticated"
        #: Nothing to check: skip the per-call work entirely.
        self.open = not configured and anonymous == "read-write" and not self.authenticated_ac_writers

    def identify(self, context) -> Identity:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, rest = str(value).partition(" ")
                if scheme.lower() != "bearer" or not rest:
                    raise Unauthenticated("the authorization header must be 'Bearer <token>'")
                token = rest.strip()
                break
        if token is not None:
            if self.jwt is not None and token.count(".") == 2:
                return self.jwt.verify(token)
            identity = self.tokens.get(hashlib.sha256(token.encode()).hexdigest())
            if identity is None:
                raise Unauthenticated("unknown bearer token")
            return identity
        if self.subjects:
            auth = context.auth_context() or {}
            for field in ("x509_subject_name", "x509_common_name"):
                for value in auth.get(field, ()):
                    identity = self.subjects.get(value.decode() if isinstance(value, bytes) else value)
                    if identity is not None:
                        return identity
        return self.anonymous

    def check(self, context, instance: str, write: bool, what: str, detail: str = "") -> Identity:
        """Raise PERMISSION_DENIED / UNAUTHENTICATED unless the caller may do this."""
        if self.open:
            if write:
                audit.info("write by anonymous: %s on instance %r%s", what, instance, f" {detail}" if detail else "")
            return self.anonymous
        try:
            identity = self.identify(context)
        except Unauthenticated as exc:
            audit.warning("denied %s on instance %r%s: %s", what, instance, f" {detail}" if detail else "", exc)
            raise
        scope = "write" if write else "read"
        if not identity.allows(scope, instance):
            audit.warning("denied %s to %s on instance %r%s: no %s scope", what, identity.name, instance,
                          f" {detail}" if detail else "", scope)
            if not identity.authenticated:
                raise Unauthenticated(f"{what} on instance {instance!r} needs credentials with the {scope} scope")
            raise PermissionDenied(f"{identity.name} has no {scope} scope on instance {instance!r} ({what})")
        if write:
            audit.info("write by %s: %s on instance %r%s", identity.name, what, instance,
                       f" {detail}" if detail else "")
        return identity

    def check_action_cache_writer(self, identity: Identity, instance: str) -> None:
        if self.authenticated_ac_writers and not identity.authenticated:
            audit.warning("denied UpdateActionResult to %s on instance %r: action-cache-writers is authenticated",
                          identity.name, instance)
            raise PermissionDenied("UpdateActionResult needs an authenticated writer on this server")
