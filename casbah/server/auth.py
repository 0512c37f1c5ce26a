"""Who is calling, and may they read or write this instance.

Identities come from, in order: a bearer token (`authorization: Bearer …`) that is
either a static token listed by its SHA-256 in the tokens file or a JWT (HS256
with a shared secret, RS256 with a JWKS file) — an unknown or invalid token is
refused, never taken as anonymous; the client certificate's subject (or common
name) under mTLS; else the anonymous identity.  Each identity has scopes (`read`,
`write`; write implies read) and optionally a set of instances it is limited to.

Every denied call and every write is written to the `casbah.audit` log: who,
what, which instance, which digest.  A cache that anyone can write to can poison
every build that reads from it, so when any authentication method is configured,
anonymous clients get nothing unless `anonymous` says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casbah.config import AuthConfig
from casbah.errors import InvalidArgument, PermissionDenied, Unauthenticated
from casbah.server.audit import audit, audit_write_when_done
from casbah.server.client_cert import certificate_subject, has_control_character, peer_certificate

_SCOPES = {"read": frozenset({"read"}), "write": frozenset({"read", "write"})}
_ANONYMOUS = {"read-write": _SCOPES["write"], "read-only": _SCOPES["read"], "none": frozenset()}


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
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"auth.tokens: cannot read {path}: {exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, rest = line.partition(" ")
        where = f"{path}:{number}"
        if not digest.startswith("sha256:") or len(digest) != 71 or not _is_hex(digest[7:]):
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
    `casbah_instances`: a list of instance names; absent = every instance).  A claim
    of any other type (null, a number, an object) makes the token UNAUTHENTICATED:
    a grant nobody can read unambiguously is no grant.
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
        try:
            if spec.get("secret-file"):
                self.secret = Path(spec["secret-file"]).read_text().strip()
            if spec.get("jwks"):
                jwks = json.loads(Path(spec["jwks"]).read_text())
                for key in jwks.get("keys", []):
                    self.keys[key.get("kid", "")] = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(key))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, jwt.PyJWTError) as exc:
            raise InvalidArgument(f"auth.jwt: cannot load the key material: {type(exc).__name__}: {exc}") from None
        if self.secret is not None and not isinstance(self.secret, str):
            raise InvalidArgument("auth.jwt.secret must be a string")
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
                key, algorithms = self._rsa_key(header.get("kid")), ["RS256"]
            else:
                raise Unauthenticated(f"JWT algorithm {header.get('alg')!r} is not accepted")
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp"], "verify_aud": self.audience is not None})
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"invalid JWT: {exc}") from None
        except (TypeError, ValueError) as exc:  # a malformed header or key id PyJWT lets through
            raise Unauthenticated(f"invalid JWT: {exc}") from None
        return Identity(f"jwt:{self._subject(claims)}", self._scopes(claims), self._instances(claims),
                        authenticated=True)

    def _scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        """The scope claim: a space-separated string or a list of strings; absent grants nothing.

        Anything else (null, a number, an object) is a token nobody meant to issue:
        refused rather than read as some scope, or as none.
        """
        if self.scope_claim not in claims:
            return frozenset()
        raw = claims[self.scope_claim]
        if isinstance(raw, str):
            granted = set(raw.split())
        elif isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            granted = set(raw)
        else:
            raise Unauthenticated(f"JWT claim {self.scope_claim!r} must be a string or a list of strings, "
                                  f"got {_shown(raw)}")
        if granted & {"write", "casbah:write"}:
            return _SCOPES["write"]
        if granted & {"read", "casbah:read"}:
            return _SCOPES["read"]
        return frozenset()

    def _instances(self, claims: dict[str, Any]) -> frozenset[str] | None:
        """The instances claim: absent = every instance; a list of names (a lone string
        names one instance).  `null`, `{}`, `0`… are refused: only absence means "all"."""
        if self.instances_claim not in claims:
            return None
        raw = claims[self.instances_claim]
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise Unauthenticated(f"JWT claim {self.instances_claim!r} must be a list of instance names, "
                                  f"got {_shown(raw)}")
        return frozenset(raw)

    @staticmethod
    def _subject(claims: dict[str, Any]) -> str:
        """`sub` names the caller in audit lines: a string without control characters."""
        sub = claims.get("sub", "?")
        if not isinstance(sub, str) or has_control_character(sub):
            raise Unauthenticated(f"JWT claim 'sub' must be a string without control characters, got {_shown(sub)}")
        return sub

    def _rsa_key(self, kid: str | None) -> Any:
        """The JWKS key a token names; a token without `kid` only when the set has one key."""
        if kid is not None:
            key = self.keys.get(kid)
            if key is None:
                raise Unauthenticated(f"JWT key id {kid!r} is not in the JWKS file")
            return key
        if len(self.keys) != 1:
            raise Unauthenticated("JWT has no 'kid' header and the JWKS file holds several keys")
        return next(iter(self.keys.values()))


def _shown(value: object) -> str:
    """A claim value for an error message: JSON, cut short."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def digest_list(messages, limit: int = 64) -> str:
    """`HASH/SIZE, …` of digest messages for an audit line; long batches end with `(+N more)`."""
    shown = [f"{m.hash}/{m.size_bytes}" for m in messages[:limit]]
    rest = len(messages) - len(shown)
    return ", ".join(shown) + (f" (+{rest} more)" if rest > 0 else "")


def parse_subject(text: str) -> tuple[tuple[str, str], ...]:
    """A configured distinguished name as a sorted tuple of (ATTRIBUTE, value), so that spellings agree.

    RFC 2253 writes a subject most specific attribute *first* (`O=Example,CN=ci-writer`
    for a certificate whose CN comes last), while `openssl x509 -subject` prints
    `CN = ci-writer, O = Example` or `/CN=ci-writer/O=Example`, depending on
    version and flags.  Comparing attribute sets makes every one of these match the
    pairs `client_cert.certificate_subject` reads from the certificate itself.
    """
    text = text.strip()
    if text.startswith("/"):  # OpenSSL's legacy one-line form
        parts = [p for p in text.split("/") if p]
    else:
        parts, current, escaped = [], [], False
        for char in text:
            if escaped:
                current.append(char)
                escaped = False
            elif char == "\\":
                current.append(char)
                escaped = True
            elif char in ",+":  # RDN separator, or several attributes in one RDN
                parts.append("".join(current))
                current = []
            else:
                current.append(char)
        parts.append("".join(current))
    pairs = []
    for part in parts:
        attribute, sep, value = part.partition("=")
        if not sep or not attribute.strip():
            raise ValueError(f"{text!r} is not a distinguished name (want e.g. 'CN=ci-writer,O=Example')")
        value = value.strip()
        # Unescape RFC 2253 `\,` `\+` `\"` … (hex escapes `\2C` are rare in subjects: left as written).
        value = "".join(c for i, c in enumerate(value) if c != "\\" or (i and value[i - 1] == "\\"))
        pairs.append((attribute.strip().upper(), value))
    return tuple(sorted(pairs))


class Authorizer:
    def __init__(self, config: AuthConfig, per_instance: dict[str, str] | None = None) -> None:
        self.tokens = load_tokens(config.tokens) if config.tokens else {}
        self.jwt = JwtVerifier(config.jwt) if config.jwt else None
        #: mTLS subjects: keys with `=` are whole distinguished names, others a common name.
        self.subjects: dict[tuple[tuple[str, str], ...], Identity] = {}
        self.common_names: dict[str, Identity] = {}
        for subject, spec in config.mtls_subjects.items():
            where = f"auth.mtls-subjects.{subject}"
            identity = Identity(f"mtls:{subject}", *_grant(spec, where), authenticated=True)
            if "=" in subject:
                try:
                    self.subjects[parse_subject(subject)] = identity
                except ValueError as exc:
                    raise InvalidArgument(f"{where}: {exc}") from None
            else:
                self.common_names[subject.strip()] = identity
        configured = bool(config.tokens or config.jwt or config.mtls_subjects)
        anonymous = config.anonymous or ("none" if configured else "read-write")
        self.anonymous = Identity("anonymous", _ANONYMOUS[anonymous])
        #: Instances whose `anonymous` setting overrides the server-wide one.
        self.anonymous_by_instance = {
            name: Identity("anonymous", _ANONYMOUS[value]) for name, value in (per_instance or {}).items()
        }
        self.authenticated_ac_writers = config.action_cache_writers == "authenticated"
        #: Nothing to check: skip the per-call work entirely.
        self.open = (not configured and anonymous == "read-write" and not self.authenticated_ac_writers
                     and all(v == "read-write" for v in (per_instance or {}).values()))

    def reload_tokens(self, path: str) -> int:
        """Read the tokens file again (SIGHUP, or it changed); returns how many tokens it holds.
        Raises what `load_tokens` raises, leaving the current tokens in place."""
        tokens = load_tokens(path)
        self.tokens = tokens
        return len(tokens)

    def anonymous_for(self, instance: str) -> Identity:
        """What a caller without credentials may do on this instance."""
        if self.open:
            return self.anonymous
        return self.anonymous_by_instance.get(instance, self.anonymous)

    def identify(self, context) -> Identity:
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, rest = str(value).partition(" ")
                if scheme.lower() != "bearer" or not rest.strip():
                    raise Unauthenticated("the authorization header must be 'Bearer <token>'")
                token = rest.strip()
                break
        if token is not None:
            hexdigest = hashlib.sha256(token.encode()).hexdigest()
            identity = self.tokens.get(hexdigest)
            if identity is not None:
                return identity
            if self.jwt is not None and token.count(".") == 2:
                return self.jwt.verify(token)
            # The hash names the token in the audit log without revealing it.
            raise Unauthenticated(f"unknown bearer token (sha256:{hexdigest[:12]}…)")
        if self.subjects or self.common_names:
            pem = peer_certificate(context.auth_context() or {})
            if pem is not None:
                # From the parsed certificate, never gRPC's x509_subject / x509_common_name
                # strings, which end at the first NUL (see client_cert).
                subject = certificate_subject(pem)
                identity = self.subjects.get(subject.pairs)
                if identity is None and subject.common_name is not None:
                    identity = self.common_names.get(subject.common_name)
                if identity is not None:
                    return identity
        return self.anonymous

    def check(self, context, instance: str, write: bool, what: str, detail: str = "",
              action_cache: bool = False) -> Identity:
        """Raise PERMISSION_DENIED / UNAUTHENTICATED unless the caller may do this.

        `action_cache` marks an ActionCache write, which `action-cache-writers:
        authenticated` reserves for authenticated identities.  Audit lines read
        `DENIED|WRITE <what> on instance '<name>' [<digests>] by <who> (peer <address>)`.
        """
        target = f" {detail}" if detail else ""
        if self.open:
            if write:
                audit_write_when_done("WRITE %s on instance %r%s by anonymous (peer %s)",
                             (what, instance, target, _peer(context)))
            return self.anonymous
        try:
            identity = self.identify(context)
            if identity is self.anonymous:
                identity = self.anonymous_for(instance)
        except Unauthenticated as exc:
            audit.warning("DENIED %s on instance %r%s by unauthenticated caller (peer %s): %s", what, instance,
                          target, _peer(context), exc)
            raise
        scope = "write" if write else "read"
        if not identity.allows(scope, instance):
            audit.warning("DENIED %s on instance %r%s by %s (peer %s): no %s scope", what, instance, target,
                          identity.name, _peer(context), scope)
            if not identity.authenticated:
                raise Unauthenticated(f"{what} on instance {instance!r} needs credentials with the {scope} scope")
            raise PermissionDenied(f"{identity.name} has no {scope} scope on instance {instance!r} ({what})")
        if write and action_cache and self.authenticated_ac_writers and not identity.authenticated:
            audit.warning("DENIED %s on instance %r%s by %s (peer %s): action-cache-writers is 'authenticated'",
                          what, instance, target, identity.name, _peer(context))
            raise PermissionDenied(
                f"{what} needs an authenticated writer on this server (action-cache-writers: authenticated)"
            )
        if write:
            audit_write_when_done("WRITE %s on instance %r%s by %s (peer %s)",
                         (what, instance, target, identity.name, _peer(context)))
        return identity

    def visible(self, context, names: list[str]) -> list[str] | None:
        """The instance names this caller may read, to list when it named an unknown one;
        None when it has no valid credentials and may read nothing (it learns no names).
        Raises UNAUTHENTICATED for a credential that does not verify."""
        if self.open or context is None:
            return names
        identity = self.identify(context)
        if identity is self.anonymous:
            shown = [n for n in names if self.anonymous_for(n).allows("read", n)]
            return shown or None
        return [n for n in names if identity.allows("read", n)]

    def audit_write(self, context, instance: str, what: str, detail: str) -> None:
        """An audit line for a write the server makes on a caller's behalf after the call
        was allowed (an origin fetch stores content a read-only caller asked for), in the
        `WRITE …` format of `check`."""
        try:
            who = "anonymous" if self.open else self.identify(context).name
        except Unauthenticated:
            who = "unauthenticated caller"
        audit.info("WRITE %s on instance %r %s by %s (peer %s)", what, instance, detail, who, _peer(context))




def _is_hex(text: str) -> bool:
    return text.isascii() and all(c in "0123456789abcdefABCDEF" for c in text)

def _peer(context) -> str:
    try:
        return str(context.peer()) if context is not None else "?"
    except Exception:  # a context without a peer (tests, closed calls): the line still gets written
        return "?"
