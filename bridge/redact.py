"""The one place that knows how to scrub secrets out of text before anyone can read it."""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, quote_plus

REDACTED = "[REDACTED]"

# Shorter values would also match ordinary words and ids, blacking out half of every log
# line while protecting nothing: no credential these APIs issue is that short.
MIN_SECRET_LENGTH = 6

# Registration happens from the event loop and (rarely) the token-refresh path, while
# redaction may run on executor threads through stdlib logging, so mutation and the lazy
# rebuild share a lock; readers only ever see a fully built pattern.
_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None
_stale = False

# Names whose value is a credential. Separators vary by API and generation (api-key,
# api_key, apikey, clientSecret, OSDI-API-Token), so the text patterns accept any of them.
_NAMES = (
    r"x[-_]?application[-_]?api[-_]?key|x[-_]?api[-_]?key|osdi[-_]?api[-_]?token"
    r"|api[-_]?key|access[-_]?token|refresh[-_]?token|client[-_]?secret"
    r"|authorization|token|code"
)
# Only spellings that are HTTP headers may use "name: value": a config error such as
# "$.an.api_key: required" must keep its reason.
_HEADER_NAMES = r"authorization|osdi-api-token|x-application-api-key|x-api-key|api-key"
# A value of five digits or fewer is a status or error code (code=422), and is shorter
# than any secret we would register anyway.
_NOT_A_CODE = r"(?!\d{1,5}\b)"
# An optional auth scheme, so "Authorization: Bearer xyz" hides the token, not the word.
_SCHEME = r"(?:(?:bearer|basic|token)\s+)?"
# A bare value stops where URLs, headers and reprs put their delimiters.
_BARE_VALUE = r"""[^\s"'\\&,;<>(){}\[\]#]+"""

_CREDENTIAL_RE = re.compile(
    # "key": "value" in JSON, in Python reprs (single quotes) and in JSON inside a string.
    rf"""(?P<quoted>\\?["'](?:{_NAMES})\\?["']\s*:\s*\\?["']){_NOT_A_CODE}[^"'\\\n]+"""
    # Header lines: "Authorization: Bearer xyz", "OSDI-API-Token: abc".
    rf"|(?P<header>(?<![\w-])(?:{_HEADER_NAMES})\s*:\s*){_SCHEME}{_BARE_VALUE}"
    # Query strings, form bodies and keyword reprs: ?api-key=..., &code=..., token='...'.
    rf"|(?P<param>(?<![\w-])(?:{_NAMES})\s*=\s*[\"']?){_NOT_A_CODE}{_SCHEME}{_BARE_VALUE}"
    # A bearer token on its own; six characters is the floor so "Bearer token" survives.
    r"|(?P<bearer>\bbearer\s+)[A-Za-z0-9\-._~+/]{6,}=*"
    # GHL private integration tokens.
    r"|pit-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    # JWTs (GHL OAuth tokens are JWTs); "eyJ" is base64 of '{"' so it is case-sensitive.
    r"|(?-i:eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)",
    re.IGNORECASE,
)

# Dict keys and log fields whose value is hidden whatever it looks like, compared after
# folding case and separators. "code" is left out: as a field it is an HTTP or error code.
_SENSITIVE_KEYS = frozenset(
    {
        "apikey",
        "accesstoken",
        "refreshtoken",
        "clientsecret",
        "token",
        "osdiapitoken",
        "xapikey",
        "xapplicationapikey",
        "authorization",
    }
)

# Deeper than any payload we log; past it a cyclic or runaway structure is flattened
# instead of blowing the stack inside a logging call.
_MAX_DEPTH = 32


def _spellings(value: str) -> set[str]:
    # Credential files often end with a newline that is not part of the secret.
    value = value.strip()
    if len(value) < MIN_SECRET_LENGTH:
        return set()
    # A secret sent in a query string or form body appears percent-encoded in URLs.
    return {value, quote(value, safe=""), quote_plus(value, safe="")}


def register_secret(value: str) -> None:
    """Make ``value`` (and its URL-encoded spellings) be redacted from now on."""
    global _stale
    variants = _spellings(value)
    if not variants:
        return
    with _lock:
        if not variants <= _secrets:
            _secrets.update(variants)
            _stale = True


def forget_secret(value: str) -> None:
    """Stop redacting ``value`` specially, e.g. a token two rotations old.

    The alternation is matched position by position, so its cost grows with the number of
    secrets; a daemon that registers every rotated token should forget superseded ones.
    """
    global _stale
    variants = _spellings(value)
    with _lock:
        if variants & _secrets:
            _secrets.difference_update(variants)
            _stale = True


def clear_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _stale, _secret_pattern
    with _lock:
        _secrets.clear()
        _secret_pattern = None
        _stale = False


def _current_secret_pattern() -> re.Pattern[str] | None:
    global _stale, _secret_pattern
    if _stale:
        with _lock:
            if _stale:
                # Longest first, so a secret that contains another is removed whole.
                ordered = sorted(_secrets, key=len, reverse=True)
                _secret_pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
                _stale = False
    return _secret_pattern


def _mask_credential(match: re.Match[str]) -> str:
    prefix = match["quoted"] or match["header"] or match["param"] or match["bearer"] or ""
    return prefix + REDACTED


def redact(text: str) -> str:
    """Return ``text`` with registered secrets and credential-looking values replaced."""
    pattern = _current_secret_pattern()
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _CREDENTIAL_RE.sub(_mask_credential, text)


def is_sensitive_key(key: str) -> bool:
    """Tell whether a field or dict key named ``key`` holds a credential."""
    return key.lower().replace("-", "").replace("_", "") in _SENSITIVE_KEYS


def _walk(obj: object, *, stringify: bool, depth: int = 0) -> object:
    if isinstance(obj, str):
        return redact(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, (dict, list, tuple)):
        if depth >= _MAX_DEPTH:
            return redact(repr(obj))
        if isinstance(obj, dict):
            return {
                (redact(k) if isinstance(k, str) else k): (
                    REDACTED
                    if isinstance(k, str) and v is not None and is_sensitive_key(k)
                    else _walk(v, stringify=stringify, depth=depth + 1)
                )
                for k, v in obj.items()
            }
        items = (_walk(v, stringify=stringify, depth=depth + 1) for v in obj)
        return list(items) if isinstance(obj, list) else tuple(items)
    if not stringify:
        return obj
    # An exception's repr keeps its type; str() of anything else is what a reader wants.
    return redact(repr(obj) if isinstance(obj, BaseException) else str(obj))


def redact_value(obj: object) -> object:
    """Redact every string inside ``obj``, rebuilding dicts, lists and tuples, and hide
    the whole value under a credential-named key; other objects are returned as they are."""
    return _walk(obj, stringify=False)


def redact_for_output(obj: object) -> object:
    """Like :func:`redact_value`, but also turn other objects into redacted text, since a
    renderer would otherwise call their ``repr`` after redaction had run."""
    return _walk(obj, stringify=True)
