"""RequestAuthentication: JWT verification as a pure decision object (no I/O).

Compiled from the snapshot's ``ConfigObject(kind="RequestAuthentication")`` entries (spec:
``selector.matchLabels``, ``jwtRules[]`` with ``issuer``, ``audiences``, ``jwksUri`` |
``jwks``, ``fromHeaders[{name, prefix}]``, ``fromParams[]``, ``forwardOriginalToken``,
``outputPayloadToHeader``, ``outputClaimToHeaders[{header, claim}]``). Istio's semantics,
as its control plane compiles them into Envoy's ``jwt_authn`` filter:

* **Which policies apply.** Unlike PeerAuthentication, every applicable policy counts and
  their rules are merged: namespace-wide ones (no selector) in the workload's namespace and
  in the root namespace (the MeshConfig's), and selecting ones in either whose
  ``matchLabels`` are among the workload's labels. Rules are ordered by issuer.
* **Where a token is looked for.** A rule's ``fromHeaders`` / ``fromParams``; when it has
  neither, ``Authorization: Bearer <token>`` and the ``access_token`` query parameter. The
  header prefix is compared case-insensitively (an auth scheme is, RFC 9110 11.1).
* **Outcomes.** No token anywhere: NONE, the request goes on without a request principal
  (an AuthorizationPolicy requiring ``requestPrincipals`` then denies it). A token whose
  ``iss`` no rule *for the location it was found in* names: INVALID ("Jwt issuer is not
  configured"). A token that fails verification: INVALID. Several tokens (several locations
  or repeated headers; Istio leaves the principal "undefined" then): every one must verify
  and they must name one principal, else INVALID — we refuse rather than pick.
* **Verification.** Signatures by PyJWT (``jwt.PyJWS``) with the one algorithm the token
  names, which must be asymmetric (RS256/384/512, PS256/384/512, ES256/384/512, EdDSA) and
  allowed by the key: ``alg: none`` and HS* are refused before any key is touched, so a
  token "signed" with the public key as an HMAC secret fails. Keys by ``kid``; a key
  without ``kid`` and a token without ``kid`` try every key whose type fits the ``alg``.
  ``exp`` / ``nbf`` / ``iat`` (not in the future) with a bounded clock skew (60 s, Envoy's
  default); a token whose signature verified is remembered (bounded, per authenticator,
  tied to the exact key set) so a keep-alive client's repeated token costs no second
  signature check, while times and audiences are checked on every request. ``audiences``: when set, the token's ``aud`` must contain one of them (Envoy
  ignores an ``http(s)://`` scheme and a trailing ``/`` when comparing); when unset, no
  audience check — what Istio's generated config does, whatever its docs say about the
  service name. Reasons are Envoy's texts; every failure is 401 (Envoy answers a
  refused audience with 403; a token for another audience is not a credential for this
  service, which is what 401 says — and what our users' tests expect), with ``www-authenticate: Bearer
  realm="<url>", error="invalid_token"`` (the realm without the query string: a token in
  ``access_token`` must not be echoed).
* **Keys of a ``jwksUri`` rule** come from a ``KeyLookup`` (``nodeagent.proxy.jwks``
  fetches and caches them). Before the first successful fetch there are none and every
  token of that issuer is INVALID ("Jwks remote fetch is failed"): failing closed.
* **What the driver changes on a VALID request** is returned as data (``HeaderChanges``):
  the headers (and query parameters) that carried a token, unless the verifying rule has
  ``forwardOriginalToken``; ``outputPayloadToHeader`` (base64url of the payload, as sent)
  and ``outputClaimToHeaders``. A client-sent value of any output header is removed on
  every request the policy covers, token or not: the application trusts those headers
  because the proxy writes them.

Malformed input never raises: every path ends in a ``AuthnResult``.

Wired by ``request_policy.RequestGate`` (per request, at the destination's proxy); the
agent runs ``jwks.JwksRefresher`` for the snapshot's ``jwksUri`` rules.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import unquote_to_bytes, urlsplit

from jwt import PyJWS
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import InvalidSignatureError, PyJWTError

from nodeagent.proxy.peerauth import Selector, parse_selector, root_namespace, selector_matches
from nodeagent.state import ConfigObject, NodeSnapshot, Workload

log = logging.getLogger(__name__)

NONE = "none"
VALID = "valid"
INVALID = "invalid"

DEFAULT_CLOCK_SKEW = 60.0
MAX_TOKEN_BYTES = 8192
MAX_TOKENS = 4  # tokens examined per request; each costs a signature check
MAX_VERIFIED_CACHED = 256  # per authenticator: tokens whose signature was checked (<= 2 MiB)
MIN_RSA_BITS = 2048
GRPC_UNAUTHENTICATED = 16
GRPC_PERMISSION_DENIED = 7

# Envoy's jwt_verify_lib status texts, so operators find them in Istio's docs and forums.
JWT_MISSING = "Jwt is missing"
JWT_BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
JWT_TOO_LARGE = f"Jwt is larger than {MAX_TOKEN_BYTES} bytes"
JWT_TOO_MANY = f"more than {MAX_TOKENS} Jwt tokens in one request"
JWT_HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
JWT_HEADER_BAD_JSON = "Jwt header is an invalid JSON"
JWT_HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
JWT_HEADER_ALG_NOT_SUPPORTED = "Jwt header [alg] is not supported"
JWT_HEADER_BAD_KID = "Jwt header [kid] field is not a string"
JWT_PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
JWT_PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
JWT_SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
JWT_UNKNOWN_ISSUER = "Jwt issuer is not configured"
JWT_EXPIRED = "Jwt is expired"
JWT_NOT_YET_VALID = "Jwt not yet valid"
JWT_IAT_IN_FUTURE = "Jwt [iat] is in the future"
JWT_AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
JWT_VERIFICATION_FAILS = "Jwt verification fails"
JWKS_NO_MATCHING_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
JWKS_FETCH_FAILED = "Jwks remote fetch is failed"
JWT_PRINCIPALS_DIFFER = "Jwt tokens of one request name different principals"

# Asymmetric JWS algorithms only. HS* is absent on purpose: a JWKS holds public keys, and
# accepting HMAC would let anyone who knows the public key mint tokens.
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGS_BY_CURVE = MappingProxyType({"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"})
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
SUPPORTED_ALGS = _RSA_ALGS | frozenset(_EC_ALGS_BY_CURVE.values()) | {"EdDSA"}

_ALGORITHMS = MappingProxyType({name: alg for name, alg in get_default_algorithms().items()
                                if name in SUPPORTED_ALGS})
# one verifier per algorithm, each allowing only that algorithm: immutable after import
_JWS = MappingProxyType({name: PyJWS(algorithms=[name]) for name in SUPPORTED_ALGS})

DEFAULT_HEADER = b"authorization"
DEFAULT_PREFIX = "Bearer "
DEFAULT_PARAM = b"access_token"

_TCHAR = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# headers a rule may neither read a token from (it would strip them) nor write into
RESERVED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
    "upgrade", "proxy-connection", "expect", "cookie", "set-cookie",
})
_INTERNAL_PREFIX = "x-hostmesh-"
_B64URL = re.compile(rb"^[A-Za-z0-9_-]*$")


# ------------------------------------------------------------------ keys

@dataclass(frozen=True)
class VerificationKey:
    """One usable public key of a JWKS: its ``kid`` (None without one), the algorithms it
    may verify, and the loaded ``cryptography`` key."""

    kid: str | None
    algorithms: frozenset[str]
    key: Any = field(repr=False, compare=False)

    def fits(self, alg: str, kid: str | None) -> bool:
        if alg not in self.algorithms:
            return False
        return kid is None or self.kid is None or self.kid == kid


KeySet = tuple[VerificationKey, ...]
Problems = list[tuple[str, str]]


def _key_algorithms(jwk: dict, where: str, problems: Problems) -> frozenset[str] | None:
    kty = jwk.get("kty")
    alg = jwk.get("alg")
    if kty == "oct":
        problems.append((where, 'symmetric keys (kty "oct") are refused: a JWKS must hold public keys'))
        return None
    if kty == "RSA":
        fitting = _RSA_ALGS
    elif kty == "EC":
        curve_alg = _EC_ALGS_BY_CURVE.get(jwk.get("crv"))
        if curve_alg is None:
            problems.append((where, f"EC curve {jwk.get('crv')!r} is not supported (P-256, P-384, P-521)"))
            return None
        fitting = frozenset({curve_alg})
    elif kty == "OKP":
        if jwk.get("crv") not in _OKP_CURVES:
            problems.append((where, f"OKP curve {jwk.get('crv')!r} is not supported (Ed25519, Ed448)"))
            return None
        fitting = frozenset({"EdDSA"})
    else:
        problems.append((where, f"key type {kty!r} is not supported (RSA, EC, OKP)"))
        return None
    if alg is None:
        return fitting
    if not isinstance(alg, str) or alg not in SUPPORTED_ALGS:
        problems.append((where, f"alg {alg!r} is not supported; allowed: {', '.join(sorted(SUPPORTED_ALGS))}"))
        return None
    if alg not in fitting:
        problems.append((where, f"alg {alg} does not fit a key of type {kty}"))
        return None
    return frozenset({alg})


def _load_key(jwk: dict, algorithms: frozenset[str], where: str, problems: Problems) -> Any:
    if any(private in jwk for private in ("d", "p", "q")):
        problems.append((where, "holds private key material; publish the public key only"))
        return None
    try:
        key = _ALGORITHMS[min(algorithms)].from_jwk(jwk)
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        problems.append((where, f"cannot be loaded as a public key: {exc}"))
        return None
    key_size = getattr(key, "key_size", None)
    if jwk.get("kty") == "RSA" and key_size is not None and key_size < MIN_RSA_BITS:
        problems.append((where, f"RSA key of {key_size} bits is too weak (at least {MIN_RSA_BITS})"))
        return None
    return key


def parse_jwks(text: str | bytes, where: str = "jwks") -> tuple[KeySet, Problems]:
    """A JSON Web Key Set -> its usable verification keys and the problems found (path,
    message). Keys with ``use`` other than ``sig`` are skipped silently (encryption keys
    may share a set); every other unusable key is a problem. No usable key at all is a
    problem too."""
    problems: Problems = []
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return (), [(where, f"is not valid JSON: {exc}")]
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return (), [(where, 'must be a JSON Web Key Set: a JSON object with a "keys" list')]
    keys: list[VerificationKey] = []
    for i, jwk in enumerate(doc["keys"]):
        key_where = f"{where}.keys[{i}]"
        if not isinstance(jwk, dict):
            problems.append((key_where, "must be a JSON object"))
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            problems.append((key_where, "kid must be a string"))
            continue
        algorithms = _key_algorithms(jwk, key_where, problems)
        if algorithms is None:
            continue
        key = _load_key(jwk, algorithms, key_where, problems)
        if key is not None:
            keys.append(VerificationKey(kid, algorithms, key))
    if not keys and not problems:
        problems.append((where, "has no signing key"))
    return tuple(keys), problems


# ------------------------------------------------------------------ rules

@dataclass(frozen=True)
class HeaderLocation:
    name: bytes  # lowercase
    prefix: str


@dataclass(frozen=True)
class JwtRule:
    """One compiled ``jwtRules[]`` entry. ``inline_keys`` is set for ``jwks``; a
    ``jwks_uri`` rule gets its keys from the ``KeyLookup`` at request time."""

    policy: str  # "namespace/name" of the RequestAuthentication
    issuer: str
    audiences: tuple[str, ...] = ()
    headers: tuple[HeaderLocation, ...] = (HeaderLocation(DEFAULT_HEADER, DEFAULT_PREFIX),)
    params: tuple[bytes, ...] = (DEFAULT_PARAM,)
    jwks_uri: str | None = None
    inline_keys: KeySet | None = None
    forward_original_token: bool = False
    output_payload_to_header: bytes | None = None
    output_claim_to_headers: tuple[tuple[bytes, str], ...] = ()

    def output_headers(self) -> tuple[bytes, ...]:
        names = [h for h, _ in self.output_claim_to_headers]
        if self.output_payload_to_header:
            names.append(self.output_payload_to_header)
        return tuple(names)


KeyLookup = Callable[[str], "KeySet | None"]


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []


def compile_rule(rule: Any, policy: str) -> JwtRule | None:
    """One spec rule -> JwtRule; None when it has no usable issuer (logged). A rule whose
    keys cannot be used keeps its issuer with no keys, so its tokens are refused (fail
    closed) instead of being ignored as unknown."""
    if not isinstance(rule, dict) or not isinstance(rule.get("issuer"), str) or not rule["issuer"]:
        log.warning("RequestAuthentication %s: a jwtRule without an issuer; ignored", policy)
        return None
    headers = tuple(HeaderLocation(h["name"].lower().encode("latin-1"), str(h.get("prefix", "")))
                    for h in rule.get("fromHeaders") or ()
                    if isinstance(h, dict) and isinstance(h.get("name"), str) and h["name"].isascii())
    params = tuple(p.encode() for p in _strings(rule.get("fromParams")))
    if not headers and not params:
        headers, params = (HeaderLocation(DEFAULT_HEADER, DEFAULT_PREFIX),), (DEFAULT_PARAM,)
    inline_keys = None
    jwks_uri = rule.get("jwksUri") if isinstance(rule.get("jwksUri"), str) else None
    if isinstance(rule.get("jwks"), str):
        inline_keys, problems = parse_jwks(rule["jwks"])
        for where, message in problems:
            log.warning("RequestAuthentication %s: issuer %s: %s: %s", policy, rule["issuer"], where, message)
        jwks_uri = None
    elif jwks_uri is None:
        log.warning("RequestAuthentication %s: issuer %s has neither jwks nor jwksUri; its tokens are refused",
                    policy, rule["issuer"])
        inline_keys = ()
    payload_header = rule.get("outputPayloadToHeader")
    claims = tuple((c["header"].lower().encode("latin-1"), c["claim"])
                   for c in rule.get("outputClaimToHeaders") or ()
                   if isinstance(c, dict) and isinstance(c.get("header"), str) and c["header"].isascii()
                   and isinstance(c.get("claim"), str) and c["claim"])
    return JwtRule(
        policy=policy, issuer=rule["issuer"], audiences=tuple(_strings(rule.get("audiences"))),
        headers=headers, params=params, jwks_uri=jwks_uri, inline_keys=inline_keys,
        forward_original_token=rule.get("forwardOriginalToken") is True,
        output_payload_to_header=(payload_header.lower().encode("latin-1")
                                  if isinstance(payload_header, str) and payload_header.isascii() and payload_header
                                  else None),
        output_claim_to_headers=claims)


# ------------------------------------------------------------------ results

@dataclass(frozen=True)
class HeaderChanges:
    """What the driver does to a request the authenticator let through, in this order:
    drop every field named in ``remove``, drop the query parameters in ``remove_params``
    from the request-target (``strip_query_params``), then append ``add``."""

    remove: tuple[bytes, ...] = ()
    remove_params: tuple[bytes, ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()

    def apply(self, headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        drop = frozenset(self.remove)
        out = [(n, v) for n, v in headers if n not in drop]
        out.extend(self.add)
        return out


@dataclass(frozen=True)
class AuthnResult:
    """The outcome for one request.

    NONE: no token; passes, no request principal. VALID: ``principal`` is ``iss/sub``
    (Istio's ``request.auth.principal``), with ``claims``, ``audiences`` and ``presenter``
    (``azp``). INVALID: answer ``status`` (401)
    with ``reason`` as the body and ``www_authenticate(realm)``. ``policy`` names the
    RequestAuthentication of the rule that decided ("" for NONE and unknown issuers).
    ``changes`` apply to NONE and VALID requests alike."""

    outcome: str
    principal: str = ""
    issuer: str = ""
    subject: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    reason: str = ""
    status: int = 0
    policy: str = ""
    changes: HeaderChanges = HeaderChanges()

    @property
    def grpc_status(self) -> int:
        return GRPC_PERMISSION_DENIED if self.status == 403 else GRPC_UNAUTHENTICATED

    def www_authenticate(self, realm: str) -> bytes:
        """The ``www-authenticate`` value Envoy's jwt_authn sends with a refusal."""
        value = f'Bearer realm="{realm}"'
        if self.outcome == INVALID:
            value += ', error="invalid_token"'
        return value.encode("latin-1", "replace")


def realm_of(scheme: bytes, authority: bytes, target: bytes, max_path: int = 256) -> str:
    """Envoy's realm: the request's URL, path cut at 256 bytes; unlike Envoy, without the
    query string, which may hold the very token being refused."""
    path = target.split(b"?", 1)[0][:max_path]
    text = (scheme + b"://" + authority + path).decode("latin-1")
    return "".join(c if " " <= c < "\x7f" and c not in '"\\' else "%%%02X" % ord(c) for c in text)


def strip_query_params(target: bytes, names: Iterable[bytes]) -> bytes:
    """``target`` without the query parameters ``names`` (matched after percent-decoding)."""
    drop = frozenset(names)
    path, sep, query = target.partition(b"?")
    if not sep or not drop:
        return target
    kept = [part for part in query.split(b"&") if _param_name(part) not in drop]
    return path + (b"?" + b"&".join(kept) if kept else b"")


def _param_name(part: bytes) -> bytes:
    name = part.partition(b"=")[0]
    return unquote_to_bytes(name) if b"%" in name else name


# ------------------------------------------------------------------ token parsing

class _Refused(Exception):
    """A token that is not valid; ``args[0]`` is the reason. Internal: never escapes."""

    def __init__(self, reason: str, status: int = 401, policy: str = "") -> None:
        super().__init__(reason)
        self.reason, self.status, self.policy = reason, status, policy


def _b64decode(segment: str, reason: str) -> bytes:
    raw = segment.encode("ascii", "replace")
    if not _B64URL.match(raw) or len(raw) % 4 == 1:
        raise _Refused(reason)
    try:
        return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise _Refused(reason) from None


def _json_object(raw: bytes, reason: str) -> dict:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _Refused(reason) from None
    if not isinstance(value, dict):
        raise _Refused(reason)
    return value


@dataclass(frozen=True)
class _Token:
    text: str
    header: dict
    payload: dict
    payload_segment: str


def _parse(text: str) -> _Token:
    if len(text) > MAX_TOKEN_BYTES:
        raise _Refused(JWT_TOO_LARGE)
    parts = text.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise _Refused(JWT_BAD_FORMAT)
    header = _json_object(_b64decode(parts[0], JWT_HEADER_BAD_BASE64), JWT_HEADER_BAD_JSON)
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise _Refused(JWT_HEADER_BAD_ALG)
    if alg not in SUPPORTED_ALGS:
        raise _Refused(JWT_HEADER_ALG_NOT_SUPPORTED)
    if "kid" in header and not isinstance(header["kid"], str):
        raise _Refused(JWT_HEADER_BAD_KID)
    payload = _json_object(_b64decode(parts[1], JWT_PAYLOAD_BAD_BASE64), JWT_PAYLOAD_BAD_JSON)
    _b64decode(parts[2], JWT_SIGNATURE_BAD_BASE64)
    for name in ("iss", "sub", "azp"):
        if name in payload and not isinstance(payload[name], str):
            raise _Refused(f"Jwt payload [{name}] field is not a string")
    return _Token(text, header, payload, parts[1])


def _number(payload: dict, name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Refused(f"Jwt payload [{name}] field is not a number")
    return float(value)


def _token_audiences(payload: dict) -> tuple[str, ...]:
    aud = payload.get("aud")
    if aud is None:
        return ()
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        return tuple(aud)
    raise _Refused("Jwt payload [aud] field is not a string or string list")


def _normalize_audience(aud: str) -> str:
    for scheme in ("https://", "http://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme):]
            break
    return aud.rstrip("/")


# ------------------------------------------------------------------ the authenticator

@dataclass(frozen=True)
class _Found:
    token: str
    rules: tuple[JwtRule, ...]  # the rules whose locations include where it was found
    header: bytes | None = None
    param: bytes | None = None


class Authenticator:
    """Verifies the tokens of requests to one workload against its merged rules."""

    def __init__(self, rules: Sequence[JwtRule], keys: KeyLookup, *,
                 clock_skew: float = DEFAULT_CLOCK_SKEW, clock: Callable[[], float] = time.time) -> None:
        self.rules = tuple(sorted(rules, key=lambda r: r.issuer))
        self._keys = keys
        self._skew = clock_skew
        self._clock = clock
        # each location with the rules that read it, and the prefix lowercased, computed once
        self._header_locations = tuple(
            (loc, loc.prefix.lower().encode("latin-1", "replace"), tuple(r for r in self.rules if loc in r.headers))
            for loc in dict.fromkeys(loc for r in self.rules for loc in r.headers))
        self._params = {p: tuple(r for r in self.rules if p in r.params)
                        for p in dict.fromkeys(p for r in self.rules for p in r.params)}
        # token text -> (rule, key set) it verified with: a keep-alive client sends the same
        # token again and again; the signature is not checked twice against the same keys
        # (times are, on every request)
        self._verified: dict[str, tuple[JwtRule, KeySet]] = {}
        self._protected = tuple(dict.fromkeys(h for r in self.rules for h in r.output_headers()))

    # -- extraction
    def _find(self, headers: Sequence[tuple[bytes, bytes]], query: bytes) -> list[_Found]:
        found: list[_Found] = []
        for loc, prefix, rules in self._header_locations:
            for name, value in headers:
                if name != loc.name or not value.lower().startswith(prefix):
                    continue
                found.append(_Found(value[len(prefix):].strip().decode("latin-1"), rules, header=loc.name))
        if query and self._params:
            for part in query.split(b"&"):
                name, _, value = part.partition(b"=")
                name = unquote_to_bytes(name) if b"%" in name else name
                rules = self._params.get(name)
                if rules is not None:
                    value = unquote_to_bytes(value) if b"%" in value else value
                    found.append(_Found(value.decode("latin-1"), rules, param=name))
        return found

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]], query: bytes = b"") -> AuthnResult:
        """``headers``: (lowercase name, value) pairs; ``query``: the raw query string."""
        base = HeaderChanges(remove=self._protected)
        try:
            found = self._find(headers, query)
        except Exception:  # defensive: extraction must never take the request down
            log.exception("RequestAuthentication: token extraction failed")
            return AuthnResult(INVALID, reason=JWT_BAD_FORMAT, status=401)
        if not found:
            return AuthnResult(NONE, changes=base)
        if len(found) > MAX_TOKENS:
            return AuthnResult(INVALID, reason=JWT_TOO_MANY, status=401)
        verified: list[tuple[_Found, JwtRule, _Token]] = []
        for item in found:
            try:
                rule, token = self._verify(item)
            except _Refused as refused:
                return AuthnResult(INVALID, reason=refused.reason, status=refused.status, policy=refused.policy)
            except Exception:  # PyJWT or cryptography surprises: refuse, never raise
                log.exception("RequestAuthentication: unexpected error verifying a token")
                return AuthnResult(INVALID, reason=JWT_VERIFICATION_FAILS, status=401)
            verified.append((item, rule, token))
        return self._accept(verified, base)

    def _accept(self, verified: list[tuple[_Found, JwtRule, _Token]], base: HeaderChanges) -> AuthnResult:
        principals = {f"{t.payload['iss']}/{t.payload.get('sub', '')}" for _, _, t in verified}
        if len(principals) > 1:
            return AuthnResult(INVALID, reason=JWT_PRINCIPALS_DIFFER, status=401)
        remove = list(base.remove)
        params: list[bytes] = []
        add: list[tuple[bytes, bytes]] = []
        for item, rule, token in verified:
            if not rule.forward_original_token:
                if item.header is not None:
                    remove.append(item.header)
                if item.param is not None:
                    params.append(item.param)
            add.extend(_outputs(rule, token))
        _, rule, token = verified[0]
        payload = token.payload
        return AuthnResult(
            VALID, principal=principals.pop(), issuer=payload["iss"], subject=payload.get("sub", ""),
            claims=MappingProxyType(payload), audiences=_token_audiences(payload), presenter=payload.get("azp", ""),
            policy=rule.policy,
            changes=HeaderChanges(tuple(dict.fromkeys(remove)), tuple(dict.fromkeys(params)),
                                  tuple(dict.fromkeys(add))))

    # -- verification of one token
    def _verify(self, item: _Found) -> tuple[JwtRule, _Token]:
        token = _parse(item.token)
        issuer = token.payload.get("iss")
        candidates = [r for r in item.rules if r.issuer == issuer]
        if not candidates:
            raise _Refused(JWT_UNKNOWN_ISSUER)
        first: _Refused | None = None
        for rule in candidates:  # one unless several policies name the issuer
            try:
                self._check(rule, token)
                return rule, token
            except _Refused as refused:
                refused.policy = refused.policy or rule.policy
                first = first or refused
        assert first is not None
        raise first

    def _check(self, rule: JwtRule, token: _Token) -> None:
        keys = rule.inline_keys if rule.jwks_uri is None else self._keys(rule.jwks_uri)
        if keys is None:
            raise _Refused(JWKS_FETCH_FAILED)
        cached = self._verified.get(token.text)
        if cached is None or cached[0] is not rule or cached[1] is not keys:
            alg, kid = token.header["alg"], token.header.get("kid")
            fitting = [k for k in keys if k.fits(alg, kid)]
            if not fitting:
                raise _Refused(JWKS_NO_MATCHING_KEY)
            if not any(_signature_ok(token.text, alg, k.key) for k in fitting):
                raise _Refused(JWT_VERIFICATION_FAILS)
            if len(self._verified) >= MAX_VERIFIED_CACHED:
                self._verified.clear()
            self._verified[token.text] = (rule, keys)
        self._check_times(token.payload)
        if rule.audiences:
            wanted = {_normalize_audience(a) for a in rule.audiences}
            if not any(_normalize_audience(a) in wanted for a in _token_audiences(token.payload)):
                raise _Refused(JWT_AUDIENCE_NOT_ALLOWED)
        else:
            _token_audiences(token.payload)  # a malformed aud is refused even when unchecked

    def _check_times(self, payload: dict) -> None:
        now = self._clock()
        exp, nbf, iat = _number(payload, "exp"), _number(payload, "nbf"), _number(payload, "iat")
        if exp is not None and now > exp + self._skew:
            raise _Refused(JWT_EXPIRED)
        if nbf is not None and now + self._skew < nbf:
            raise _Refused(JWT_NOT_YET_VALID)
        if iat is not None and now + self._skew < iat:
            raise _Refused(JWT_IAT_IN_FUTURE)


def _signature_ok(text: str, alg: str, key: Any) -> bool:
    try:
        _JWS[alg].decode_complete(text, key, algorithms=[alg])
    except (InvalidSignatureError, PyJWTError):  # PyJWTError: e.g. a signature of the wrong length
        return False
    return True


def _claim(payload: dict, path: str) -> Any:
    value: Any = payload
    for part in path.split("."):  # Istio/Envoy nested claims: "a.b"
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _outputs(rule: JwtRule, token: _Token) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if rule.output_payload_to_header:
        out.append((rule.output_payload_to_header, token.payload_segment.encode("ascii")))
    for header, claim in rule.output_claim_to_headers:
        value = _claim(token.payload, claim)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            text = str(value)
        else:
            continue  # Envoy copies strings, numbers and booleans only
        raw = text.encode("utf-8")
        if any(b < 0x20 and b != 0x09 or b == 0x7F for b in raw):
            continue  # a claim must not inject header fields
        out.append((header, raw))
    return out


# ------------------------------------------------------------------ from the snapshot

@dataclass(frozen=True)
class _Policy:
    namespace: str
    name: str
    selector: Selector | None
    rules: tuple[JwtRule, ...]


def parse_policy(obj: ConfigObject) -> _Policy:
    policy = f"{obj.namespace}/{obj.name}"
    try:
        spec = json.loads(obj.spec)
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        # fail closed: a rule-less selecting policy would accept anything; an unknown-issuer
        # rule refuses every token while tokenless requests still meet AuthorizationPolicy
        log.warning("RequestAuthentication %s: spec is not a JSON object; every token is refused", policy)
        return _Policy(obj.namespace, obj.name, None, (JwtRule(policy, "\0invalid-policy", inline_keys=()),))
    rules = tuple(r for r in (compile_rule(raw, policy) for raw in spec.get("jwtRules") or ()) if r is not None)
    return _Policy(obj.namespace, obj.name, parse_selector(spec, obj), rules)


class RequestAuthn:
    """The ``Authenticator`` for a workload, from the snapshot a connection took; None when
    no RequestAuthentication applies. Parsed policies are kept per ConfigObject (value-
    equal objects in the next snapshot are not parsed again), authenticators per
    (snapshot, workload)."""

    def __init__(self, keys: KeyLookup, *, clock_skew: float = DEFAULT_CLOCK_SKEW,
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._skew = clock_skew
        self._clock = clock
        self._snapshot: NodeSnapshot | None = None
        self._policies: dict[ConfigObject, _Policy] = {}
        self._root = ""
        self._answers: dict[Workload, Authenticator | None] = {}

    def for_workload(self, snapshot: NodeSnapshot, workload: Workload) -> Authenticator | None:
        if snapshot is not self._snapshot:
            self._load(snapshot)
        if workload not in self._answers:
            self._answers[workload] = self._build(workload)
        return self._answers[workload]

    def policies(self, snapshot: NodeSnapshot, workload: Workload) -> list[str]:
        """``namespace/name`` of the policies in force for ``workload`` (for config dumps)."""
        if snapshot is not self._snapshot:
            self._load(snapshot)
        return [f"{p.namespace}/{p.name}" for p in self._applicable(workload)]

    def jwks_uris(self, snapshot: NodeSnapshot) -> set[str]:
        """Every ``jwksUri`` of the snapshot's policies: what the key fetcher keeps fresh."""
        if snapshot is not self._snapshot:
            self._load(snapshot)
        return {r.jwks_uri for p in self._policies.values() for r in p.rules if r.jwks_uri}

    def _load(self, snapshot: NodeSnapshot) -> None:
        policies: dict[ConfigObject, _Policy] = {}
        for obj in snapshot.config:
            if obj.kind == "RequestAuthentication":
                policies[obj] = self._policies.get(obj) or parse_policy(obj)
        self._snapshot, self._policies, self._root = snapshot, policies, root_namespace(snapshot)
        self._answers = {}

    def _applicable(self, workload: Workload) -> list[_Policy]:
        labels = dict(workload.labels)
        scopes = {workload.namespace, self._root} if self._root else {workload.namespace}
        chosen = [p for p in self._policies.values() if p.namespace in scopes
                  and (p.selector is None or selector_matches(p.selector, labels))]
        return sorted(chosen, key=lambda p: (p.namespace, p.name))

    def _build(self, workload: Workload) -> Authenticator | None:
        policies = self._applicable(workload)
        if not policies:
            return None
        rules = [r for p in policies for r in p.rules]
        return Authenticator(rules, self._keys, clock_skew=self._skew, clock=self._clock)


# ------------------------------------------------------------------ validation for the control plane

def _header_problem(value: Any, *, output: bool) -> str | None:
    if not isinstance(value, str) or not value:
        return "must be a non-empty header name"
    if not _TCHAR.match(value):
        return f"{value!r} is not a valid HTTP header name"
    lower = value.lower()
    if lower in RESERVED_HEADERS:
        return f"{value!r} is a header the proxy must not {'write' if output else 'strip'}"
    if output and lower.startswith(_INTERNAL_PREFIX):
        return f"{value!r}: headers starting with {_INTERNAL_PREFIX} are the mesh's own"
    return None


def _https_problem(value: Any) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        return f"{value!r} is not a URL"
    if parts.scheme != "https" or not parts.hostname:
        return f"{value!r} is not an https:// URL"
    return None


def validate_jwt_rule(spec: Any) -> Problems:
    """Problems of one ``jwtRules[]`` entry as (path relative to the rule, message); [] if
    none. Pure: the control plane calls it before anything is pushed."""
    if not isinstance(spec, dict):
        return [("", "must be an object")]
    problems: Problems = []
    issuer = spec.get("issuer")
    if not isinstance(issuer, str) or not issuer.strip():
        problems.append(("issuer", "must be a non-empty string"))
    has_jwks, has_uri = spec.get("jwks") is not None, spec.get("jwksUri") is not None
    if has_jwks and has_uri:
        problems.append(("jwks", "jwks and jwksUri are exclusive: give the keys inline or where to fetch them"))
    elif not has_jwks and not has_uri:
        problems.append(("jwksUri", "one of jwks or jwksUri is required (OpenID discovery is not supported)"))
    if has_uri and (problem := _https_problem(spec["jwksUri"])):
        problems.append(("jwksUri", problem))
    if has_jwks:
        if not isinstance(spec["jwks"], str):
            problems.append(("jwks", "must be a string holding the JSON Web Key Set"))
        else:
            problems.extend(parse_jwks(spec["jwks"])[1])
    for i, aud in enumerate(spec.get("audiences") or ()):
        if not isinstance(aud, str) or not aud:
            problems.append((f"audiences[{i}]", "must be a non-empty string"))
    for i, loc in enumerate(spec.get("fromHeaders") or ()):
        if not isinstance(loc, dict):
            problems.append((f"fromHeaders[{i}]", "must be an object with name and prefix"))
            continue
        if problem := _header_problem(loc.get("name"), output=False):
            problems.append((f"fromHeaders[{i}].name", problem))
        prefix = loc.get("prefix", "")
        if not isinstance(prefix, str) or any(not (" " <= c < "\x7f") for c in prefix):
            problems.append((f"fromHeaders[{i}].prefix", "must be printable ASCII"))
    for i, param in enumerate(spec.get("fromParams") or ()):
        if not isinstance(param, str) or not param or any(c in param for c in "&=#? ") or not param.isprintable():
            problems.append((f"fromParams[{i}]", f"{param!r} is not a query parameter name"))
    if spec.get("outputPayloadToHeader") is not None:
        if problem := _header_problem(spec["outputPayloadToHeader"], output=True):
            problems.append(("outputPayloadToHeader", problem))
    for i, out in enumerate(spec.get("outputClaimToHeaders") or ()):
        if not isinstance(out, dict):
            problems.append((f"outputClaimToHeaders[{i}]", "must be an object with header and claim"))
            continue
        if problem := _header_problem(out.get("header"), output=True):
            problems.append((f"outputClaimToHeaders[{i}].header", problem))
        if not isinstance(out.get("claim"), str) or not out["claim"]:
            problems.append((f"outputClaimToHeaders[{i}].claim", "must be a non-empty claim name"))
    return problems
