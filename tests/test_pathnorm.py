"""Path normalization (Envoy normalize_path + merge_slashes + escaped-slash action): a corpus,
a bypass sweep against `paths: ["/public/*"]`, and a fuzz property. Pure, no sockets."""

from __future__ import annotations

import itertools
import re
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.proxy.authz import string_matcher
from nodeagent.proxy.l7.pathnorm import (EscapedSlashes, NormalizedTarget, PathRejected, normalize_path,
                                         normalize_target)

KEEP, REJECT = EscapedSlashes.KEEP_UNCHANGED, EscapedSlashes.REJECT
FORWARD, REDIRECT = EscapedSlashes.UNESCAPE_AND_FORWARD, EscapedSlashes.UNESCAPE_AND_REDIRECT
X = PathRejected  # expected: refused

# (target, expected path or X) with the default options (REJECT encoded slashes, merge slashes)
CORPUS: list[tuple[str | bytes, str | type]] = [
    # already normal
    ("/", "/"), ("/a", "/a"), ("/a/", "/a/"), ("/a/b/c", "/a/b/c"), ("/a-b_c.d~e", "/a-b_c.d~e"),
    ("/!$&'()*+,;=:@", "/!$&'()*+,;=:@"), ("/.well-known/x", "/.well-known/x"), ("/a.b/c..d", "/a.b/c..d"),
    ("/...", "/..."), ("/a/.../b", "/a/.../b"), ("/.a/..b", "/.a/..b"),
    # dot segments, RFC 3986 5.2.4
    ("/.", "/"), ("/..", "/"), ("/./", "/"), ("/../", "/"), ("/a/.", "/a/"), ("/a/..", "/"), ("/a/./b", "/a/b"),
    ("/a/../b", "/b"), ("/a/b/../../c", "/c"), ("/a/b/../../../../c", "/c"), ("/../../etc/passwd", "/etc/passwd"),
    ("/a/b/c/./../../g", "/a/g"), ("/mid/content=5/../6", "/mid/6"), ("/a/b/..", "/a/"), ("/a/b/../", "/a/"),
    ("/public/../admin", "/admin"), ("/public/./admin", "/public/admin"), ("/public/x/../../admin", "/admin"),
    # encoded dots are dot segments
    ("/public/%2e%2e/admin", "/admin"), ("/public/%2E%2E/admin", "/admin"), ("/public/%2e./admin", "/admin"),
    ("/public/.%2e/admin", "/admin"), ("/public/%2E./admin", "/admin"), ("/public/%2e/admin", "/public/admin"),
    ("/%2e%2e", "/"), ("/a/%2e", "/a/"), ("/a%2eb", "/a.b"), ("/%2e%2e%2e", "/..."),
    # unreserved decoding, uppercase of the rest, no double decoding
    ("/%41%42%43", "/ABC"), ("/%61%62%63", "/abc"), ("/%30%39", "/09"), ("/%2d%5f%7e%2D%5F%7E", "/-_~-_~"),
    ("/a%20b", "/a%20b"), ("/a%3fb", "/a%3Fb"), ("/a%3Fb", "/a%3Fb"), ("/%23", "/%23"), ("/%25", "/%25"),
    ("/%252e%252e/admin", "/%252e%252e/admin"), ("/%25%32%65", "/%252e"), ("/%3a%40", "/%3A%40"),
    ("/a%2Cb%3Bc", "/a%2Cb%3Bc"), ("/%0a", "/%0A"), ("/%0d%0a", "/%0D%0A"), ("/%7f", "/%7F"), ("/%ff%fe", X),
    ("/%e2%82%ac", "/%E2%82%AC"), ("/%E2%82%AC", "/%E2%82%AC"), ("/%c3%bc", "/%C3%BC"),
    ("/%f0%9f%98%80", "/%F0%9F%98%80"),
    # overlong and broken UTF-8
    ("/%c0%ae", X), ("/%c0%ae%c0%ae/admin", X), ("/public/%c0%ae%c0%ae/admin", X), ("/%c0%af", X),
    ("/%e0%80%ae", X), ("/%f0%80%80%ae", X), ("/%c1%9c", X), ("/%80", X), ("/%bf", X), ("/%c3", X),
    ("/%e2%82", X), ("/%ed%a0%80", X), ("/%f4%90%80%80", X), ("/%fe", X), ("/%c3/x", X),
    (b"/\xc0\xae", X), (b"/\xff", X), (b"/caf\xc3\xa9", "/caf%C3%A9"), ("/café", "/caf%C3%A9"),
    # percent-encoding syntax
    ("/%", X), ("/%2", X), ("/%zz", X), ("/%g0", X), ("/a%", X), ("/%%32%65", X), ("/%2x", X), ("/%-1", X),
    # NUL and control characters
    ("/%00", X), ("/a%00b", X), ("/%00/admin", X), ("/a\x00b", X), ("/a\tb", X), ("/a\nb", X), ("/a\rb", X),
    ("/a b", X), ("/a\x7fb", X), ("/a\x1bb", X), ("/?a b", X),
    # encoded slashes (default: reject)
    ("/a%2fb", X), ("/a%2Fb", X), ("/a%5cb", X), ("/a%5Cb", X), ("/public/..%2fadmin", X),
    ("/public/%2e%2e%2fadmin", X), ("/public%2f..%2fadmin", X),
    # backslash
    ("/a\\b", "/a/b"), ("/public\\..\\admin", "/admin"), ("/public/..\\admin", "/admin"), ("\\/a", X),
    ("/\\\\a", "/a"),
    # slash merging
    ("//", "/"), ("///", "/"), ("//a", "/a"), ("/a//b", "/a/b"), ("/a///b//", "/a/b/"), ("/a//../b", "/a/b"),
    ("/public//../admin", "/public/admin"), ("//public/../admin", "/admin"), ("/a/.//b", "/a/b"),
    # raw characters a path may not contain are encoded
    ('/a"b', "/a%22b"), ("/a<b>", "/a%3Cb%3E"), ("/a`b", "/a%60b"), ("/a{b}", "/a%7Bb%7D"), ("/a|b", "/a%7Cb"),
    ("/a^b", "/a%5Eb"), ("/a[b]", "/a%5Bb%5D"),
    # dot segments with path parameters (Tomcat/Spring read them as dot segments)
    ("/public/..;/admin", X), ("/public/.;/admin", X), ("/public/..;x=1/admin", X), ("/public/%2e%2e;/admin", X),
    ("/a;b", "/a;b"), ("/a/b;c=1/d", "/a/b;c=1/d"), ("/..a;/b", "/..a;/b"),
    # query kept apart and untouched
    ("/a?b", "/a"), ("/a/../b?x=/../y", "/b"), ("/a?%00", "/a"), ("/a?q=%2F", "/a"), ("/a%2e?x=%2e", "/a."),
    # fragment and other target forms
    ("/a#b", X), ("/a?b#c", X), ("/#", X), ("*", X), ("http://host/a", X), ("host:443", X), ("", X),
    ("a/b", X), ("../a", X), ("%2fa", X), (b"", X),
]

QUERY_CASES = [("/a?b=c", "b=c"), ("/a?", ""), ("/a", None), ("/x/../y?q=%41%2F..", "q=%41%2F.."),
               ("/a??b", "?b"), ("/a?b?c", "b?c")]

ESCAPED_SLASH_CASES = [
    # (target, action, expected path or X, redirect)
    ("/a%2fb", KEEP, "/a%2Fb", False), ("/a%5cb", KEEP, "/a%5Cb", False), ("/public/..%2Fadmin", KEEP,
                                                                          "/public/..%2Fadmin", False),
    ("/a%2fb", FORWARD, "/a/b", False), ("/a%5Cb", FORWARD, "/a/b", False),
    ("/public/..%2fadmin", FORWARD, "/admin", False), ("/public/%2e%2e%2Fadmin", FORWARD, "/admin", False),
    ("/a%2f%2fb", FORWARD, "/a/b", False), ("/a%2fb", REDIRECT, "/a/b", True), ("/a/b", REDIRECT, "/a/b", False),
    ("/public%2f..%2fadmin", REDIRECT, "/admin", True), ("/a%2fb", REJECT, X, False),
]


def _expect(target, want, **options):
    if want is X:
        with pytest.raises(PathRejected) as info:
            normalize_path(target, **options)
        assert str(info.value) and info.value.status == 400
    else:
        assert normalize_path(target, **options) == want


@pytest.mark.parametrize("target,want", CORPUS)
def test_corpus(target, want):
    _expect(target, want)


@pytest.mark.parametrize("target,query", QUERY_CASES)
def test_query_is_kept_apart(target, query):
    got = normalize_target(target)
    assert got.query == query
    assert got.target == got.path + ("" if query is None else "?" + query)


@pytest.mark.parametrize("target,action,want,redirect", ESCAPED_SLASH_CASES)
def test_escaped_slash_actions(target, action, want, redirect):
    _expect(target, want, escaped_slashes=action)
    if want is not X:
        assert normalize_target(target, escaped_slashes=action).redirect is redirect


def test_merge_slashes_can_be_off():
    assert normalize_path("/a//b", merge_slashes=False) == "/a//b"
    assert normalize_path("/a//../b", merge_slashes=False) == "/a/b"   # RFC 3986: ".." removes the empty segment
    assert normalize_path("//..//a", merge_slashes=False) == "//a"


def test_bytes_and_str_agree():
    for target, want in CORPUS:
        if isinstance(target, str) and want is not X and target.isascii():
            assert normalize_path(target.encode()) == want


def test_corpus_is_large_enough():
    assert len(CORPUS) + len(QUERY_CASES) + len(ESCAPED_SLASH_CASES) + len(BYPASS_TARGETS) >= 200


# ------------------------------------------------------------------ bypass sweep against paths: ["/public/*"]

def _backend_view(path: str, decode_slashes: bool) -> str:
    """What a backend that percent-decodes once and then resolves dot segments and '\\' reads
    (the strongest single-decoding interpretation). With ``decode_slashes`` False it keeps
    %2F/%5C as data, as RFC 3986 says."""
    if not decode_slashes:
        path = re.sub("%(2[fF]|5[cC])", lambda m: "%25" + m.group(1), path)
    raw = unquote_to_bytes(path).decode("utf-8", "replace").replace("\\", "/")
    out: list[str] = []
    for seg in raw.split("/")[1:]:
        if seg.split(";")[0] in (".", ".."):
            if seg.split(";")[0] == ".." and out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(s for s in out if s)


DOTS = ["..", "%2e%2e", "%2E%2E", "%2e.", ".%2e", "%2E.", ".%2E", "%2e%2E", "..;", "%2e%2e;", "%c0%ae%c0%ae",
        "%c0%2e%c0%2e", "%e0%80%ae%e0%80%ae", "%252e%252e", "..%00", "%00..", ".", "%2e", "...", ". .", "..%20"]
SEPS = ["/", "%2f", "%2F", "\\", "%5c", "%5C", "//", "/./", "/%2e/", "\\\\", "%252f"]
BYPASS_TARGETS = ["/public/" + d + s + "admin" for d, s in itertools.product(DOTS, SEPS)] + [
    "/public/../admin", "/public/%2e%2e/admin", "/public/%2E./admin", "/public/x/../../admin",
    "/public/..%2f..%2fadmin", "/public/../../admin", "/public/%2e%2e/%2e%2e/admin", "//public/../admin",
    "/public/.././admin", "/public/..//admin", "/public/%2e%2e%5cadmin", "/public\\..\\admin",
    "/public/..\\admin", "/public/%c0%ae%c0%ae/admin", "/public/..%c0%afadmin", "/public/..%ef%bc%8fadmin",
    "/public/%00/../admin", "/public/..%00/admin", "/public/.%00./admin", "/./public/../admin",
    "/PUBLIC/../admin", "/public/..?/admin", "/public/..#/admin", "/public/..%3fadmin", "/public/..%23/admin",
    "/public/..;jsessionid=1/admin", "/public/%2e%2e;/admin", "/public/.;/../admin", "/public/a/..;/../admin",
]


# an AuthorizationPolicy `paths: ["/public/*"]` rule, matched as the engine matches strings
_PUBLIC = string_matcher("/public/*")


@pytest.mark.parametrize("action", [REJECT, FORWARD, REDIRECT, KEEP])
def test_no_bypass_of_public_allow_for_admin_targets(action):
    decode_slashes = action is not KEEP  # KEEP_UNCHANGED assumes a backend that keeps %2F as data (RFC 3986)
    bypasses = []
    for target in BYPASS_TARGETS:
        try:
            normalized = normalize_target(target, escaped_slashes=action)
        except PathRejected:
            continue
        if normalized.redirect:
            continue  # the client is redirected to the normalized path, which is checked when it comes back
        seen = _backend_view(normalized.path, decode_slashes)
        if _PUBLIC(normalized.path) and not seen.startswith("/public/"):
            bypasses.append((target, normalized.path, seen))
    assert bypasses == []


def test_admin_targets_that_resolve_to_admin_are_denied():
    for target in ("/public/../admin", "/public/%2e%2e/admin", "/public/%2E./admin"):
        path = normalize_path(target)
        assert path == "/admin"
        assert not _PUBLIC(path)


# ------------------------------------------------------------------ fuzz

_ALPHABET = list("/.%\\?#;a2eEfF5cC0A") + ["%2e", "%2E", "%2f", "%5c", "%c0", "%ae", "%00", "..", "//", "\x00",
                                          " ", "\x7f", "é", "%e2%82%ac"]
_DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def _check_result(target: str, action: EscapedSlashes) -> None:
    try:
        got = normalize_target(target, escaped_slashes=action)
    except PathRejected as exc:
        assert str(exc)
        return
    assert isinstance(got, NormalizedTarget)
    path = got.path
    assert path.startswith("/")
    assert "//" not in path and not _DOT_SEGMENT.search(path), path
    assert all(33 <= ord(c) < 127 for c in path), path
    assert "?" not in path and "#" not in path
    # idempotent: a normalized path normalizes to itself
    assert normalize_path(path, escaped_slashes=KEEP if action is KEEP else REJECT) == path
    # one more decoding by the backend creates no dot segment (%2F kept as data unless unescaped)
    seen = _backend_view(path, decode_slashes=False)
    assert not _DOT_SEGMENT.search(seen.replace("%2F", "x").replace("%5C", "x")), (target, path, seen)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_ALPHABET), max_size=24).map(lambda parts: "/" + "".join(parts)),
       st.sampled_from(list(EscapedSlashes)))
def test_fuzz_structured(target, action):
    _check_result(target, action)


@settings(max_examples=1500, deadline=None)
@given(st.text(max_size=40), st.sampled_from(list(EscapedSlashes)))
def test_fuzz_any_text(target, action):
    _check_result(target, action)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40))
def test_fuzz_bytes(target):
    try:
        path = normalize_path(b"/" + target)
    except PathRejected:
        return
    assert path.startswith("/") and "//" not in path and not _DOT_SEGMENT.search(path)
