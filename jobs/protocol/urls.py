"""OPENAI_BASE_URL may carry credentials (`https://user:key@host/v1`): what of it may be
shown; and what OPENAI_API_KEY may hold. Shared by the runners, which send them, and the
settings, which check them."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# http.client refuses a header holding a line break, and quotes it whole in its error.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
KEY_HELP = ("OPENAI_API_KEY holds a line break or another control character, which a header "
            "cannot carry (it is not shown here): set it to the key alone")


def usable_key(key: str | None) -> str | None:
    """The key as it is sent: without the spaces and line ends around it (a key file saved
    with Windows line ends leaves a carriage return); ValueError(KEY_HELP) if one is left
    within it; None for none."""
    key = key.strip() if key else None
    if key and _CONTROL.search(key):
        raise ValueError(KEY_HELP)
    return key or None


def misplaced_userinfo(url: str) -> bool:
    """A `user:password@` that an unencoded '/', '?' or '#' cut short: the URL's parser
    then sees no credentials, so they would be shown, and not sent."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        return False
    return "@" not in netloc and "@" in url.partition("://")[2]


USERINFO_HELP = ("OPENAI_BASE_URL holds an '@' after its host: percent-encode '/', '?', '#' "
                 "and '@' in its user and password (e.g. '/' as %2F)")


def public_url(url: str) -> str:
    """`url` without the `user:password@` it may carry: what may be shown, logged or stored."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = urlsplit("")
    if "@" not in parts.netloc:  # none; or not a URL: then keep no part that may be one
        return url if parts.netloc else url.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
