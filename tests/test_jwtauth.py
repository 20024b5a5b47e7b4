"""RequestAuthentication: the JWT verifier, JWKS key management and rule validation.

No privileges: keys made with ``cryptography``, tokens signed with PyJWT, JWKS served by
fake fetchers and one local HTTPS server on 127.0.0.1 with a self-signed certificate.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import ssl
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from prometheus_client import CollectorRegistry

from nodeagent.proxy import jwtauth as ja
from nodeagent.proxy.jwks import (HTTP_ERROR, INVALID_JWKS, NETWORK_ERROR, OK, TIMEOUT, HttpsJwksFetcher,
                                  JwksCache, JwksFetchError, JwksRefresher, retry_delay)
from nodeagent.state import ConfigObject, NodeSnapshot, Workload

pytestmark = pytest.mark.timeout(60)

ISS = "https://issuer.example.com"
URI = "https://keys.example.com/jwks.json"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
EC384_KEY = ec.generate_private_key(ec.SECP384R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk_of(private, kid: str | None = None, **extra) -> dict:
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        doc = json.loads(RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        doc = json.loads(ECAlgorithm.to_jwk(public))
    else:
        doc = json.loads(OKPAlgorithm.to_jwk(public))
    if kid is not None:
        doc["kid"] = kid
    doc.update(extra)
    return doc


def jwks_text(*jwks: dict) -> str:
    return json.dumps({"keys": list(jwks)})


def claims(**over) -> dict:
    now = time.time()
    base = {"iss": ISS, "sub": "alice", "aud": "shop", "exp": int(now) + 300, "iat": int(now) - 10}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(private=RSA_KEY, alg="RS256", kid: str | None = "k1", **over) -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims(**over), private, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, payload: dict, signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"


def authenticator(*rules: dict, keys=lambda uri: None, **kw) -> ja.Authenticator:
    compiled = [ja.compile_rule(r, "shop/authn") for r in rules]
    return ja.Authenticator(compiled, keys, **kw)


def rule(**over) -> dict:
    base = {"issuer": ISS, "jwks": jwks_text(jwk_of(RSA_KEY, "k1"))}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


def check(auth: ja.Authenticator, token: str) -> ja.AuthnResult:
    return auth.authenticate(bearer(token) + [(b"accept", b"*/*")])


# ------------------------------------------------------------------ valid tokens

@pytest.mark.parametrize("private,alg,jwk", [
    (RSA_KEY, "RS256", jwk_of(RSA_KEY, "k1")),
    (RSA_KEY, "RS384", jwk_of(RSA_KEY, "k1")),
    (RSA_KEY, "RS512", jwk_of(RSA_KEY, "k1")),
    (RSA_KEY, "PS256", jwk_of(RSA_KEY, "k1")),
    (RSA_KEY, "PS512", jwk_of(RSA_KEY, "k1")),
    (EC_KEY, "ES256", jwk_of(EC_KEY, "k1")),
    (EC384_KEY, "ES384", jwk_of(EC384_KEY, "k1")),
    (ED_KEY, "EdDSA", jwk_of(ED_KEY, "k1")),
])
def test_valid_token_passes_with_principal_iss_sub(private, alg, jwk):
    auth = authenticator(rule(jwks=jwks_text(jwk)))
    result = check(auth, sign(private, alg, azp="web-client", aud=["shop", "other"]))
    assert result.outcome == ja.VALID, result.reason
    assert result.principal == f"{ISS}/alice"
    assert result.issuer == ISS and result.subject == "alice"
    assert result.audiences == ("shop", "other")
    assert result.presenter == "web-client"
    assert result.claims["sub"] == "alice"
    assert result.policy == "shop/authn"
    # forwardOriginalToken defaults to false: the token header is stripped
    assert result.changes.apply(bearer("x") + [(b"accept", b"*/*")]) == [(b"accept", b"*/*")]


def test_no_token_passes_without_principal():
    result = authenticator(rule()).authenticate([(b"accept", b"*/*")], b"q=1")
    assert result.outcome == ja.NONE and result.principal == ""


def test_other_authorization_schemes_are_no_token():
    result = authenticator(rule()).authenticate([(b"authorization", b"Basic dXNlcjpwYXNz")])
    assert result.outcome == ja.NONE


def test_bearer_prefix_is_case_insensitive():
    result = authenticator(rule()).authenticate([(b"authorization", b"bearer " + sign().encode())])
    assert result.outcome == ja.VALID


# ------------------------------------------------------------------ invalid tokens

def test_expired():
    result = check(authenticator(rule()), sign(exp=int(time.time()) - 120))
    assert (result.outcome, result.reason, result.status) == (ja.INVALID, ja.JWT_EXPIRED, 401)


def test_expiry_within_clock_skew_passes_and_skew_is_configurable():
    token = sign(exp=int(time.time()) - 30)
    assert check(authenticator(rule()), token).outcome == ja.VALID
    assert check(authenticator(rule(), clock_skew=5), token).reason == ja.JWT_EXPIRED


def test_not_yet_valid():
    result = check(authenticator(rule()), sign(nbf=int(time.time()) + 600))
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_NOT_YET_VALID)


def test_issued_in_the_future():
    result = check(authenticator(rule()), sign(iat=int(time.time()) + 600))
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_IAT_IN_FUTURE)


def test_injected_clock():
    token = sign(exp=1_000_000, iat=None)
    assert check(authenticator(rule(), clock=lambda: 999_000.0), token).outcome == ja.VALID
    assert check(authenticator(rule(), clock=lambda: 1_000_061.0), token).reason == ja.JWT_EXPIRED


def test_non_numeric_exp_is_invalid():
    assert check(authenticator(rule()), sign(exp="tomorrow")).outcome == ja.INVALID


def test_wrong_audience_is_refused_401():
    result = check(authenticator(rule(audiences=["billing"])), sign(aud="shop"))
    assert (result.outcome, result.reason, result.status) == (ja.INVALID, ja.JWT_AUDIENCE_NOT_ALLOWED, 401)
    assert result.grpc_status == ja.GRPC_UNAUTHENTICATED


def test_audience_any_of_and_envoy_normalization():
    auth = authenticator(rule(audiences=["https://shop.example.com/", "billing"]))
    assert check(auth, sign(aud=["x", "shop.example.com"])).outcome == ja.VALID
    assert check(auth, sign(aud="http://shop.example.com")).outcome == ja.VALID
    assert check(auth, sign(aud=None)).reason == ja.JWT_AUDIENCE_NOT_ALLOWED


def test_audiences_unset_accepts_any_audience():
    assert check(authenticator(rule()), sign(aud="anything")).outcome == ja.VALID
    assert check(authenticator(rule()), sign(aud=None)).outcome == ja.VALID


def test_wrong_issuer():
    result = check(authenticator(rule()), sign(iss="https://evil.example.com"))
    assert (result.outcome, result.reason, result.status) == (ja.INVALID, ja.JWT_UNKNOWN_ISSUER, 401)
    assert result.grpc_status == ja.GRPC_UNAUTHENTICATED


def test_bad_signature():
    result = check(authenticator(rule()), sign(RSA_OTHER))
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_VERIFICATION_FAILS)


def test_tampered_payload():
    header, _, signature = sign().split(".")
    payload = b64(json.dumps(claims(sub="admin")).encode())
    assert check(authenticator(rule()), f"{header}.{payload}.{signature}").reason == ja.JWT_VERIFICATION_FAILS


def test_alg_none_is_refused():
    for token in (forged({"alg": "none", "typ": "JWT"}, claims()),
                  forged({"alg": "None"}, claims()), forged({"alg": "NONE", "kid": "k1"}, claims())):
        result = check(authenticator(rule()), token)
        assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_HEADER_ALG_NOT_SUPPORTED)


@pytest.mark.parametrize("alg,digest", [("HS256", hashlib.sha256), ("HS384", hashlib.sha384),
                                        ("HS512", hashlib.sha512)])
def test_hmac_signed_with_the_public_key_is_refused(alg, digest):
    """The classic key-confusion attack: HMAC over the token with the RSA public key (PEM
    and JWK forms) as the secret."""
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    for secret in (pem, json.dumps(jwk_of(RSA_KEY, "k1")).encode()):
        head = b64(json.dumps({"alg": alg, "kid": "k1"}).encode()) + "." + b64(json.dumps(claims()).encode())
        token = head + "." + b64(hmac.new(secret, head.encode(), digest).digest())
        result = check(authenticator(rule()), token)
        assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_HEADER_ALG_NOT_SUPPORTED)


def test_alg_must_fit_the_key():
    # an ES256 token against an RSA-only JWKS; an RS256 token against a key pinned to PS256
    assert check(authenticator(rule()), sign(EC_KEY, "ES256")).reason == ja.JWKS_NO_MATCHING_KEY
    pinned = rule(jwks=jwks_text(jwk_of(RSA_KEY, "k1", alg="PS256")))
    assert check(authenticator(pinned), sign(alg="RS256")).reason == ja.JWKS_NO_MATCHING_KEY
    assert check(authenticator(pinned), sign(alg="PS256")).outcome == ja.VALID


def test_kid_selects_the_key_and_a_mismatch_is_refused():
    two = rule(jwks=jwks_text(jwk_of(RSA_OTHER, "k0"), jwk_of(RSA_KEY, "k1")))
    assert check(authenticator(two), sign(kid="k1")).outcome == ja.VALID
    result = check(authenticator(two), sign(kid="k9"))
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWKS_NO_MATCHING_KEY)
    # the right kid on the wrong key: the signature check decides
    assert check(authenticator(two), sign(kid="k0")).reason == ja.JWT_VERIFICATION_FAILS


def test_without_kid_every_fitting_key_is_tried():
    keys = rule(jwks=jwks_text(jwk_of(RSA_OTHER, "k0"), jwk_of(EC_KEY), jwk_of(RSA_KEY, "k1")))
    assert check(authenticator(keys), sign(kid=None)).outcome == ja.VALID
    assert check(authenticator(keys), sign(EC_KEY, "ES256", kid="whatever")).outcome == ja.VALID


@pytest.mark.parametrize("token,reason", [
    ("", ja.JWT_BAD_FORMAT),
    ("garbage", ja.JWT_BAD_FORMAT),
    ("a.b", ja.JWT_BAD_FORMAT),
    ("a.b.c.d", ja.JWT_BAD_FORMAT),
    ("!!!.eyJ9.c2ln", ja.JWT_HEADER_BAD_BASE64),
    (b64(b"not json") + ".eyJ9.c2ln", ja.JWT_HEADER_BAD_JSON),
    (b64(b"[1,2]") + ".eyJ9.c2ln", ja.JWT_HEADER_BAD_JSON),
    (b64(b'{"typ":"JWT"}') + ".eyJ9.c2ln", ja.JWT_HEADER_BAD_ALG),
    (b64(b'{"alg":7}') + ".eyJ9.c2ln", ja.JWT_HEADER_BAD_ALG),
    (b64(b'{"alg":"RS256","kid":5}') + ".eyJ9.c2ln", ja.JWT_HEADER_BAD_KID),
    (b64(b'{"alg":"RS256"}') + ".%%%.c2ln", ja.JWT_PAYLOAD_BAD_BASE64),
    (b64(b'{"alg":"RS256"}') + "." + b64(b"\xff\xfe") + ".c2ln", ja.JWT_PAYLOAD_BAD_JSON),
    (b64(b'{"alg":"RS256"}') + "." + b64(b'"str"') + ".c2ln", ja.JWT_PAYLOAD_BAD_JSON),
    (b64(b'{"alg":"RS256"}') + "." + b64(b'{"iss":1}') + ".c2ln", "Jwt payload [iss] field is not a string"),
    (b64(b'{"alg":"RS256"}') + "." + b64(b'{"iss":"x"}') + ".a*b", ja.JWT_SIGNATURE_BAD_BASE64),
    (b64(b'{"alg":"RS256"}') + "." + b64(b"[" * 100000 + b"]" * 100000) + ".c2ln", ja.JWT_TOO_LARGE),
    ("\u00e9\u00e9.\u00e9.\u00e9", ja.JWT_HEADER_BAD_BASE64),
])
def test_garbage_is_invalid_never_an_exception(token, reason):
    result = authenticator(rule()).authenticate([(b"authorization", b"Bearer " + token.encode("utf-8"))])
    assert (result.outcome, result.reason) == (ja.INVALID, reason)


def test_oversize_token():
    token = sign(pad="x" * 9000)
    result = check(authenticator(rule()), token)
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_TOO_LARGE)


def test_deeply_nested_payload_within_the_size_limit():
    payload = b64(b"[" * 3000 + b"]" * 3000)
    result = check(authenticator(rule()), b64(b'{"alg":"RS256"}') + "." + payload + ".c2ln")
    assert result.outcome == ja.INVALID


def test_www_authenticate_and_realm():
    result = check(authenticator(rule()), "garbage")
    realm = ja.realm_of(b"http", b"shop.svc:8080", b"/orders?access_token=secret")
    assert realm == "http://shop.svc:8080/orders"
    assert result.www_authenticate(realm) == b'Bearer realm="http://shop.svc:8080/orders", error="invalid_token"'
    assert ja.realm_of(b"http", b'a"b', b"/\x01") == "http://a%22b/%01"


# ------------------------------------------------------------------ locations

def test_token_in_custom_header_with_prefix():
    auth = authenticator(rule(fromHeaders=[{"name": "X-Jwt-Assertion", "prefix": "Istio "}]))
    token = sign()
    result = auth.authenticate([(b"x-jwt-assertion", b"Istio " + token.encode())])
    assert result.outcome == ja.VALID
    assert result.changes.remove == (b"x-jwt-assertion",)
    # the default location is not looked at when fromHeaders is given
    assert auth.authenticate(bearer(token)).outcome == ja.NONE
    # a value without the prefix is no token for that location
    assert auth.authenticate([(b"x-jwt-assertion", token.encode())]).outcome == ja.NONE


def test_token_in_query_param():
    token = sign()
    default = authenticator(rule())
    result = default.authenticate([], b"a=1&access_token=" + token.encode())
    assert result.outcome == ja.VALID
    assert result.changes.remove_params == (b"access_token",)
    assert ja.strip_query_params(b"/p?a=1&access_token=t&b=2", result.changes.remove_params) == b"/p?a=1&b=2"
    assert ja.strip_query_params(b"/p?access_token=t", [b"access_token"]) == b"/p"
    custom = authenticator(rule(fromParams=["my_token"]))
    assert custom.authenticate([], b"my_token=" + token.encode()).outcome == ja.VALID
    assert custom.authenticate([], b"access_token=" + token.encode()).outcome == ja.NONE
    assert custom.authenticate(bearer(token)).outcome == ja.NONE  # fromParams alone: no header default
    assert custom.authenticate([], b"my_token=garbage").outcome == ja.INVALID


def test_forward_original_token_keeps_it():
    result = check(authenticator(rule(forwardOriginalToken=True)), sign())
    assert result.outcome == ja.VALID and result.changes.remove == ()


def test_two_tokens_same_principal_pass_and_both_are_stripped():
    token = sign()
    result = authenticator(rule()).authenticate(bearer(token), b"access_token=" + token.encode())
    assert result.outcome == ja.VALID
    assert result.changes.remove == (b"authorization",) and result.changes.remove_params == (b"access_token",)


def test_two_tokens_one_invalid_is_invalid():
    auth = authenticator(rule())
    assert auth.authenticate(bearer(sign()), b"access_token=" + sign(RSA_OTHER).encode()).outcome == ja.INVALID
    assert auth.authenticate(bearer(sign()) + bearer("garbage")).outcome == ja.INVALID


def test_two_tokens_with_different_principals_are_refused():
    result = authenticator(rule()).authenticate(bearer(sign(sub="alice")), b"access_token=" + sign(sub="bob").encode())
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_PRINCIPALS_DIFFER)


def test_too_many_tokens():
    result = authenticator(rule()).authenticate(bearer(sign()) * (ja.MAX_TOKENS + 1))
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_TOO_MANY)


def test_two_issuers_sharing_the_default_location():
    other_iss = "https://other.example.com"
    auth = authenticator(rule(), rule(issuer=other_iss, jwks=jwks_text(jwk_of(EC_KEY, "e1"))))
    assert check(auth, sign()).principal == f"{ISS}/alice"
    assert check(auth, sign(EC_KEY, "ES256", kid="e1", iss=other_iss)).principal == f"{other_iss}/alice"
    assert check(auth, sign(EC_KEY, "ES256", kid="e1")).reason == ja.JWKS_NO_MATCHING_KEY  # ISS has RSA keys only


def test_issuer_of_another_location_is_unknown_here():
    """A token found in rule B's header whose iss is rule A's (A reads Authorization only)."""
    b_iss = "https://b.example.com"
    auth = authenticator(rule(), rule(issuer=b_iss, fromHeaders=[{"name": "x-b-token"}]))
    result = auth.authenticate([(b"x-b-token", sign().encode())])
    assert (result.outcome, result.reason) == (ja.INVALID, ja.JWT_UNKNOWN_ISSUER)


# ------------------------------------------------------------------ outputs

def test_output_payload_and_claims_to_headers():
    auth = authenticator(rule(outputPayloadToHeader="X-Jwt-Payload", outputClaimToHeaders=[
        {"header": "x-sub", "claim": "sub"}, {"header": "x-admin", "claim": "admin"},
        {"header": "x-level", "claim": "org.level"}, {"header": "x-list", "claim": "groups"},
        {"header": "x-evil", "claim": "evil"}]))
    token = sign(admin=True, org={"level": 3}, groups=["a"], evil="a\r\nx-injected: 1")
    result = check(auth, token)
    assert result.outcome == ja.VALID
    added = dict(result.changes.add)
    assert base64.urlsafe_b64decode(added[b"x-jwt-payload"] + b"==")
    assert json.loads(base64.urlsafe_b64decode(added[b"x-jwt-payload"] + b"=" * 3))["sub"] == "alice"
    assert added[b"x-sub"] == b"alice" and added[b"x-admin"] == b"true" and added[b"x-level"] == b"3"
    assert b"x-list" not in added and b"x-evil" not in added


def test_client_sent_output_headers_are_always_removed():
    auth = authenticator(rule(outputPayloadToHeader="x-jwt-payload", outputClaimToHeaders=[{"header": "x-sub",
                                                                                            "claim": "sub"}]))
    forged_headers = [(b"x-jwt-payload", b"forged"), (b"x-sub", b"admin"), (b"accept", b"*/*")]
    none = auth.authenticate(forged_headers)
    assert none.outcome == ja.NONE
    assert none.changes.apply(forged_headers) == [(b"accept", b"*/*")]
    valid = auth.authenticate(forged_headers + bearer(sign()))
    out = valid.changes.apply(forged_headers + bearer(sign()))
    assert (b"x-sub", b"alice") in out and (b"x-sub", b"admin") not in out and (b"x-jwt-payload", b"forged") not in out


# ------------------------------------------------------------------ keys from a jwksUri

def test_jwks_uri_before_first_fetch_is_invalid_then_valid():
    cache = JwksCache()
    auth = authenticator(rule(jwks=None, jwksUri=URI), keys=cache.keys)
    token = sign()
    assert check(auth, token).reason == ja.JWKS_FETCH_FAILED
    assert cache.record_body(URI, jwks_text(jwk_of(RSA_KEY, "k1")).encode()) == OK
    assert check(auth, token).outcome == ja.VALID


def test_cache_keeps_last_known_good_on_garbage():
    cache = JwksCache()
    cache.record_body(URI, jwks_text(jwk_of(RSA_KEY, "k1")).encode())
    for garbage in (b"<html>502</html>", b"{}", b'{"keys": []}', jwks_text({"kty": "oct", "k": "c2VjcmV0"}).encode()):
        assert cache.record_body(URI, garbage) == INVALID_JWKS
        assert cache.keys(URI) and cache.keys(URI)[0].kid == "k1"
    assert cache.status(URI).consecutive_failures == 4
    # a good set with one bad key: the good key is used
    assert cache.record_body(URI, jwks_text({"kty": "RSA"}, jwk_of(EC_KEY, "e1")).encode()) == OK
    assert [k.kid for k in cache.keys(URI)] == ["e1"] and cache.status(URI).consecutive_failures == 0


class FakeFetcher:
    def __init__(self) -> None:
        self.answers: list = []
        self.calls = 0

    async def __call__(self, uri: str) -> bytes:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def fetch_count(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("hostmesh_agent_jwks_fetches_total", {"result": result})


def test_refresher_last_known_good_and_metrics():
    registry = CollectorRegistry()
    cache = JwksCache()
    fetcher = FakeFetcher()
    refresher = JwksRefresher(cache, fetcher, registry)
    auth = authenticator(rule(jwks=None, jwksUri=URI), keys=cache.keys)
    token_k1, token_k2 = sign(kid="k1"), sign(RSA_OTHER, kid="k2")

    async def scenario():
        fetcher.answers = [JwksFetchError(NETWORK_ERROR, "connection refused")]
        assert await refresher.refresh_once(URI) == NETWORK_ERROR
        assert check(auth, token_k1).reason == ja.JWKS_FETCH_FAILED  # nothing known yet: refused
        fetcher.answers = [jwks_text(jwk_of(RSA_KEY, "k1")).encode()]
        assert await refresher.refresh_once(URI) == OK
        assert check(auth, token_k1).outcome == ja.VALID
        for failure in (JwksFetchError(HTTP_ERROR, "HTTP 503"), asyncio.TimeoutError(), b"not json",
                        RuntimeError("fetcher bug")):
            fetcher.answers = [failure]
            await refresher.refresh_once(URI)
            assert check(auth, token_k1).outcome == ja.VALID  # last known good
        assert cache.status(URI).consecutive_failures == 4
        # rotation: the new set replaces the old one
        fetcher.answers = [jwks_text(jwk_of(RSA_OTHER, "k2")).encode()]
        assert await refresher.refresh_once(URI) == OK
        assert check(auth, token_k2).outcome == ja.VALID
        assert check(auth, token_k1).reason == ja.JWKS_NO_MATCHING_KEY

    asyncio.run(scenario())
    assert fetch_count(registry, OK) == 2
    assert fetch_count(registry, NETWORK_ERROR) == 2  # refused + the fetcher bug
    assert fetch_count(registry, HTTP_ERROR) == 1
    assert fetch_count(registry, TIMEOUT) == 1
    assert fetch_count(registry, INVALID_JWKS) == 1


def test_retry_backoff():
    assert [retry_delay(n) for n in (1, 2, 3, 9, 10, 50)] == [1, 2, 4, 256, 300, 300]
    assert retry_delay(20, refresh_interval=60) == 60
    assert 0.9 * 8 <= retry_delay(4, jitter=-1) <= retry_delay(4, jitter=1) <= 1.1 * 8


def test_refresher_loop_refreshes_retries_and_follows_watch():
    cache = JwksCache()
    fetcher = FakeFetcher()
    refresher = JwksRefresher(cache, fetcher, refresh_interval=0.05, retry_initial=0.01, retry_max=0.02)

    async def scenario():
        fetcher.answers = [JwksFetchError(NETWORK_ERROR, "down"), JwksFetchError(NETWORK_ERROR, "down"),
                           jwks_text(jwk_of(RSA_KEY, "k1")).encode()]
        refresher.watch([URI])
        for _ in range(200):
            if cache.keys(URI):
                break
            await asyncio.sleep(0.01)
        assert cache.keys(URI) and fetcher.calls == 3  # two quick retries, then the keys
        await asyncio.sleep(0.2)
        assert fetcher.calls >= 5  # periodic refresh
        refresher.watch([])
        assert cache.keys(URI) is None
        calls = fetcher.calls
        await asyncio.sleep(0.1)
        assert fetcher.calls == calls
        await refresher.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ a real HTTPS fetch

def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_https_fetch_from_local_server_and_last_known_good_when_it_goes_away(tmp_path):
    cert_file, key_file = self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_file, key_file)
    client_ctx = ssl.create_default_context(cafile=str(cert_file))
    body = jwks_text(jwk_of(RSA_KEY, "k1")).encode()
    responses = {
        "/jwks.json": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body),
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
        "/eof": b"HTTP/1.1 200 OK\r\n\r\n" + body,
        "/missing": b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        "/huge": b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 2_000_000,
    }

    async def handle(reader, writer):
        request = await reader.readuntil(b"\r\n\r\n")
        path = request.split(b" ")[1].decode()
        writer.write(responses[path])
        try:
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        writer.close()

    async def scenario():
        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        base = f"https://127.0.0.1:{port}"
        registry = CollectorRegistry()
        cache = JwksCache()
        fetcher = HttpsJwksFetcher(client_ctx, timeout=5)
        refresher = JwksRefresher(cache, fetcher, registry)
        for path in ("/jwks.json", "/chunked", "/eof"):
            assert await fetcher(base + path) == body
        with pytest.raises(JwksFetchError) as err:
            await fetcher(base + "/missing")
        assert err.value.result == HTTP_ERROR
        with pytest.raises(JwksFetchError) as err:
            await HttpsJwksFetcher(client_ctx, max_bytes=100_000)(base + "/huge")
        assert err.value.result == NETWORK_ERROR
        # the default context does not trust the self-signed certificate
        with pytest.raises(JwksFetchError) as err:
            await HttpsJwksFetcher()(base + "/jwks.json")
        assert err.value.result == NETWORK_ERROR and "certificate" in str(err.value).lower()

        uri = base + "/jwks.json"
        auth = authenticator(rule(jwks=None, jwksUri=uri), keys=cache.keys)
        assert await refresher.refresh_once(uri) == OK
        assert check(auth, sign()).outcome == ja.VALID
        server.close()
        await server.wait_closed()
        assert await refresher.refresh_once(uri) == NETWORK_ERROR  # the server went away
        assert check(auth, sign()).outcome == ja.VALID  # last known good
        assert fetch_count(registry, NETWORK_ERROR) == 1 and fetch_count(registry, OK) == 1

    asyncio.run(scenario())


def test_fetch_timeout(tmp_path):
    async def scenario():
        async def silent(reader, writer):
            await asyncio.sleep(5)
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(JwksFetchError) as err:
            await HttpsJwksFetcher(timeout=0.2)(f"https://127.0.0.1:{port}/jwks.json")
        assert err.value.result == TIMEOUT
        server.close()

    asyncio.run(scenario())


# ------------------------------------------------------------------ from the snapshot

WEB = Workload("web", "shop", "node-2", "198.18.2.1", "web", (("app", "web"),))
DB = Workload("db", "shop", "node-2", "198.18.2.2", "db", (("app", "db"),))
OTHER = Workload("api", "other", "node-2", "198.18.2.3", "api", (("app", "web"),))


def ra(ns: str, name: str, issuer: str, **spec) -> ConfigObject:
    spec.setdefault("jwtRules", [{"issuer": issuer, "jwks": jwks_text(jwk_of(RSA_KEY, "k1"))}])
    return ConfigObject("RequestAuthentication", ns, name, json.dumps(spec))


def test_policies_merge_across_scopes_as_istio():
    snapshot = NodeSnapshot(node="node-2", workloads=(WEB, DB, OTHER), config=(
        ConfigObject("MeshConfig", "mesh-root", "default", "{}"),
        ra("mesh-root", "mesh-wide", "https://mesh"),
        ra("mesh-root", "root-selecting", "https://root-web", selector={"matchLabels": {"app": "web"}}),
        ra("shop", "ns-wide", "https://shop"),
        ra("shop", "web-only", "https://web", selector={"matchLabels": {"app": "web"}}),
        ra("other", "ns-wide", "https://other"),
    ))
    authn = ja.RequestAuthn(lambda uri: None)
    issuers = lambda w: [r.issuer for r in authn.for_workload(snapshot, w).rules]  # noqa: E731
    assert issuers(WEB) == ["https://mesh", "https://root-web", "https://shop", "https://web"]
    assert issuers(DB) == ["https://mesh", "https://shop"]
    assert issuers(OTHER) == ["https://mesh", "https://other", "https://root-web"]
    assert authn.policies(snapshot, DB) == ["mesh-root/mesh-wide", "shop/ns-wide"]
    auth = authn.for_workload(snapshot, DB)
    assert check(auth, sign(iss="https://shop")).outcome == ja.VALID
    assert check(auth, sign(iss="https://web")).reason == ja.JWT_UNKNOWN_ISSUER
    assert authn.for_workload(snapshot, DB) is auth  # cached per snapshot


def test_no_policy_means_no_authenticator_and_jwks_uris():
    snapshot = NodeSnapshot(node="node-2", workloads=(WEB,), config=(
        ra("other", "p", "x", jwtRules=[{"issuer": "a", "jwksUri": URI}, {"issuer": "b", "jwks": "{}"}]),))
    authn = ja.RequestAuthn(lambda uri: None)
    assert authn.for_workload(snapshot, WEB) is None
    assert authn.jwks_uris(snapshot) == {URI}


def test_unusable_inline_jwks_and_bad_spec_fail_closed():
    snapshot = NodeSnapshot(node="node-2", workloads=(WEB,), config=(
        ra("shop", "bad-keys", ISS, jwtRules=[{"issuer": ISS, "jwks": "not json"}]),
        ConfigObject("RequestAuthentication", "shop", "broken", "[1]"),))
    auth = ja.RequestAuthn(lambda uri: None).for_workload(snapshot, WEB)
    assert check(auth, sign()).outcome == ja.INVALID
    assert check(auth, sign(iss="https://anything")).outcome == ja.INVALID


# ------------------------------------------------------------------ validation

def problems(**spec) -> dict[str, str]:
    return dict(ja.validate_jwt_rule(spec))


def test_validate_accepts_good_rules():
    assert problems(issuer=ISS, jwksUri=URI, audiences=["a"], fromHeaders=[{"name": "x-token", "prefix": "T "}],
                    fromParams=["tok"], outputPayloadToHeader="x-jwt", forwardOriginalToken=True,
                    outputClaimToHeaders=[{"header": "x-sub", "claim": "sub"}]) == {}
    assert problems(issuer=ISS, jwks=jwks_text(jwk_of(RSA_KEY, "k1"), jwk_of(EC_KEY), jwk_of(ED_KEY),
                                               {"kty": "RSA", "use": "enc"})) == {}


@pytest.mark.parametrize("spec,path,needle", [
    ({"issuer": "", "jwksUri": URI}, "issuer", "non-empty"),
    ({"issuer": ISS, "jwksUri": URI, "jwks": jwks_text(jwk_of(RSA_KEY))}, "jwks", "exclusive"),
    ({"issuer": ISS}, "jwksUri", "required"),
    ({"issuer": ISS, "jwksUri": "http://keys.example.com/"}, "jwksUri", "https://"),
    ({"issuer": ISS, "jwks": "not json"}, "jwks", "not valid JSON"),
    ({"issuer": ISS, "jwks": '{"no": "keys"}'}, "jwks", '"keys" list'),
    ({"issuer": ISS, "jwks": '{"keys": []}'}, "jwks", "no signing key"),
    ({"issuer": ISS, "jwks": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}, "jwks.keys[0]", "symmetric"),
    ({"issuer": ISS, "jwks": '{"keys": [{"kty": "RSA", "n": "xx"}]}'}, "jwks.keys[0]", "cannot be loaded"),
    ({"issuer": ISS, "jwks": '{"keys": [{"kty": "XYZ"}]}'}, "jwks.keys[0]", "not supported"),
    ({"issuer": ISS, "jwks": jwks_text(jwk_of(RSA_KEY, alg="HS256"))}, "jwks.keys[0]", "not supported"),
    ({"issuer": ISS, "jwks": jwks_text(jwk_of(RSA_KEY, alg="ES256"))}, "jwks.keys[0]", "does not fit"),
    ({"issuer": ISS, "jwks": jwks_text(json.loads(RSAAlgorithm.to_jwk(RSA_KEY)))}, "jwks.keys[0]", "private"),
    ({"issuer": ISS, "jwks": jwks_text(jwk_of(rsa.generate_private_key(public_exponent=65537, key_size=1024)))},
     "jwks.keys[0]", "too weak"),
    ({"issuer": ISS, "jwksUri": URI, "fromHeaders": [{"name": "bad header"}]}, "fromHeaders[0].name", "not a valid"),
    ({"issuer": ISS, "jwksUri": URI, "fromHeaders": [{"name": "Content-Length"}]}, "fromHeaders[0].name", "strip"),
    ({"issuer": ISS, "jwksUri": URI, "fromHeaders": [{"name": "x", "prefix": "a\nb"}]}, "fromHeaders[0].prefix",
     "printable"),
    ({"issuer": ISS, "jwksUri": URI, "fromParams": ["a&b"]}, "fromParams[0]", "query parameter"),
    ({"issuer": ISS, "jwksUri": URI, "outputPayloadToHeader": ":authority"}, "outputPayloadToHeader", "not a valid"),
    ({"issuer": ISS, "jwksUri": URI, "outputPayloadToHeader": "host"}, "outputPayloadToHeader", "write"),
    ({"issuer": ISS, "jwksUri": URI, "outputPayloadToHeader": "x-hostmesh-flags"}, "outputPayloadToHeader",
     "mesh's own"),
    ({"issuer": ISS, "jwksUri": URI, "outputClaimToHeaders": [{"header": "x-a", "claim": ""}]},
     "outputClaimToHeaders[0].claim", "claim"),
    ({"issuer": ISS, "jwksUri": URI, "audiences": [""]}, "audiences[0]", "non-empty"),
])
def test_validate_refuses(spec, path, needle):
    found = dict(ja.validate_jwt_rule(spec))
    assert path in found, found
    assert needle in found[path]


def test_validate_never_raises_on_junk():
    for junk in (None, 1, [], {"issuer": 1, "jwks": 5, "fromHeaders": "x", "fromParams": [None],
                                "outputClaimToHeaders": [1], "audiences": [3]}):
        assert isinstance(ja.validate_jwt_rule(junk), list)


# ------------------------------------------------------------------ fuzz

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ_AUTH = authenticator(rule(), rule(issuer="https://b", fromHeaders=[{"name": "x-b", "prefix": ""}],
                                        fromParams=["t"]))
_SEGMENT = st.one_of(st.text(max_size=40), st.binary(max_size=40).map(b64),
                     st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5), st.none()),
                                     max_size=4).map(lambda d: b64(json.dumps(d).encode())))


@settings(max_examples=300, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=4), st.binary(max_size=64))
def test_fuzz_never_raises_and_never_validates(segments, query):
    token = ".".join(segments).encode("utf-8", "replace")
    for headers in (bearer(token.decode("latin-1")), [(b"x-b", token)], [(b"authorization", token)]):
        result = _FUZZ_AUTH.authenticate(headers, b"t=" + token + b"&" + query)
        assert result.outcome in (ja.INVALID, ja.NONE)


def test_a_repeated_token_is_verified_once_per_key_set(monkeypatch):
    calls = []
    real = ja._signature_ok
    monkeypatch.setattr(ja, "_signature_ok", lambda *a: calls.append(1) or real(*a))
    cache = JwksCache()
    cache.record_body(URI, jwks_text(jwk_of(RSA_KEY, "k1")).encode())
    auth = authenticator(rule(jwks=None, jwksUri=URI), keys=cache.keys)
    token = sign(exp=int(time.time()) + 100)
    assert [check(auth, token).outcome for _ in range(3)] == [ja.VALID] * 3 and len(calls) == 1
    assert check(authenticator(rule(jwks=None, jwksUri=URI), keys=cache.keys, clock=lambda: time.time() + 1000),
                 token).reason == ja.JWT_EXPIRED  # times are checked on every request
    cache.record_body(URI, jwks_text(jwk_of(RSA_OTHER, "k1")).encode())  # rotated: checked again, and fails
    assert check(auth, token).reason == ja.JWT_VERIFICATION_FAILS and len(calls) == 3  # 2: the other authenticator
