"""Secrets in URIs: masking userinfo and query strings wherever a URI is written or printed.

A URI can carry credentials in two places: its userinfo (``https://user:token@host/...``,
``s3://KEY:SECRET@bucket/...``) and its query string or fragment (signed URLs:
``?X-Amz-Signature=...``, ``?sig=...``). :func:`mask_uri` replaces the userinfo with ``***@`` and
every query / fragment value with ``***`` (the names stay), keeping the scheme, host and path so
the URI is still recognisable::

    s3://KEY:SECRET@bucket/in/*.jsonl          -> s3://***@bucket/in/*.jsonl
    https://h/f.jsonl?X-Amz-Signature=ab&x=1   -> https://h/f.jsonl?X-Amz-Signature=***&x=***
    /data/in/*.jsonl                           -> unchanged (no scheme: a local path)

:func:`mask_text` does the same to every ``scheme://...`` substring of a free text (an exception
message, a log line, a JSON dump). Both are idempotent.

The userinfo is found before the URI is split at ``/``, ``?`` or ``#``, so a malformed one is
masked whole too: a password holding ``?``, ``#``, ``/``, spaces or quotes
(``https://alice:Pa55?w0rd@host/x`` -> ``https://***@host/x``). It ends at the first ``@`` that a
host follows; ``host:8080/a@b`` is a port and a path, not a password.

Logs: :class:`MaskingFilter` masks a log record's message, arguments, traceback and stack text;
:func:`install_log_masking` (called by the CLI) puts one on every handler configured so far (the
root's first) and masks each record as it is created, so the records of loggers that do not
propagate or whose handlers come later (fsspec, s3fs, botocore, Ray Data's own) are masked too.
Only this process: Ray workers configure their own logging.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
_CHAINED = r"::[A-Za-z][A-Za-z0-9+.\-]*(?:::|://)"  # the next URI of an fsspec chain (a::b://)
# What follows "scheme://" in free text: up to whitespace, a quote, an angle bracket or a chain.
_TEXT_REST = re.compile(rf"(?:(?!{_CHAINED})[^\s'\"<>`])*")
# What follows "scheme://" in a whole URI: up to the next URI of a chain, or the end.
_WHOLE_REST = re.compile(rf"(?:(?!{_CHAINED}).)*")
# Trailing characters that end a sentence or close a bracket rather than belong to the URI.
_TRAILING = ".,;:!)]}"
# Userinfo, looked for first, before anything splits the URI at "/", "?" or "#": a user (no
# whitespace, "/", ":" or "@"), optionally ":" and a password of any characters ("?", "/", "#",
# spaces and quotes included, not "://"), then the first "@" that a host follows (no whitespace,
# "/", "?", "#" or "@", then one of those or the end). A malformed URI is masked too.
_USERINFO = re.compile(
    r"[^\s/:@'\"<>`\\]*(?::(?P<password>(?!\s)(?:(?!://)[^\n]){0,1024}?))?@"
    r"(?=[^\s/?#@'\"<>`\\]*(?:[\s/?#'\"<>`\\]|$))"
)
# A "password" that is a port and then a path, query or the text after the URI (host:8080/a@b).
_PORT = re.compile(r"\d+[\s/?#'\"<>`\\,;)\]}]")
# Userinfo whose password holds a "/" (AWS secret keys do): user ":" password "@", the user free
# of "/", ":" and "@". A "/" right after digits is a port and a path instead (host:8080/a@b).
_USERINFO_WITH_SLASH = re.compile(r"[^/:@?#]+:([^@?#]*)@")


def mask_uri(uri: str) -> str:
    """``uri`` with its userinfo and query / fragment values masked; a path without a scheme
    (``/data/x``, ``out/``) is returned unchanged. ``a::b://...`` chains mask each URI. The whole
    string is the URI: a password or query value with spaces or quotes is masked whole."""
    if "://" not in uri:
        return uri
    return _mask_all(uri, whole=True)


def mask_text(text: str) -> str:
    """``text`` with every URI-looking substring (``scheme://...``) masked as :func:`mask_uri`
    does; punctuation right after a URI (``.`` ``,`` ``)`` ...) is left in place. A URI ends at
    whitespace or a quote, except inside its userinfo (``https://u:pass word@host``)."""
    if "://" not in text:
        return text
    return _mask_all(text, whole=False)


def _mask_all(text: str, *, whole: bool) -> str:
    rest_pattern = _WHOLE_REST if whole else _TEXT_REST
    out: list[str] = []
    pos = 0
    while (scheme := _SCHEME.search(text, pos)) is not None:
        start = scheme.end()
        out.append(text[pos:start])
        info = _USERINFO.match(text, start)
        password = info.group("password") if info else None
        masked_info = info is not None and not (password and _PORT.match(password))
        if masked_info:
            assert info is not None
            out.append(MASK + "@")
            start = info.end()
        match = rest_pattern.match(text, start)
        rest = match.group() if match else ""
        out.append(_mask_rest(rest, whole=whole, userinfo=not masked_info))
        pos = start + len(rest)
    out.append(text[pos:])
    return "".join(out)


def _mask_rest(rest: str, *, whole: bool, userinfo: bool = True) -> str:
    """Masks what follows ``scheme://`` (or its masked userinfo): [userinfo@]host[/path]
    [?query][#fragment]; ``userinfo`` False when it was masked already."""
    tail = ""
    if not whole:
        stripped = rest.rstrip(_TRAILING)
        rest, tail = stripped, rest[len(stripped) :]
    fragment = query = None
    if "#" in rest:
        rest, fragment = rest.split("#", 1)
    if "?" in rest:
        rest, query = rest.split("?", 1)
    out = _mask_userinfo(rest) if userinfo else rest
    if query is not None:
        out += "?" + _mask_params(query)
    if fragment is not None:
        out += "#" + _mask_params(fragment)
    return out + tail


def _mask_userinfo(rest: str) -> str:
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        return MASK + rest[authority.rindex("@") :]
    match = _USERINFO_WITH_SLASH.match(rest)
    if match and not re.fullmatch(r"\d*", match.group(1).split("/", 1)[0]):
        return MASK + rest[match.end() - 1 :]
    return rest


def _mask_params(query: str) -> str:
    """``a=1&b=2`` -> ``a=***&b=***``; a part without ``=`` is masked whole."""
    if not query:
        return query
    parts = []
    for part in re.split(r"([&;])", query):
        if part in ("&", ";", ""):
            parts.append(part)
        elif "=" in part:
            parts.append(part.split("=", 1)[0] + "=" + MASK)
        else:
            parts.append(MASK)
    return "".join(parts)


# Logging ----------------------------------------------------------------------------------------

_MASKED = "_rgbatch_masked"


class MaskingFilter(logging.Filter):
    """Masks URIs in a record's message and arguments (merged into ``msg``), its traceback text
    and its stack text. Never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _MASKED, False):
            return True
        setattr(record, _MASKED, True)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        return True


def install_log_masking() -> None:
    """Masks URIs in every log record of this process from now on (idempotent): a
    :class:`MaskingFilter` on every handler configured so far (root's and any other logger's),
    and on every record as it is created, for handlers configured later."""
    masking = MaskingFilter()
    loggers = [logging.getLogger()] + [
        item
        for item in list(logging.Logger.manager.loggerDict.values())
        if isinstance(item, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(masking)
    factory = logging.getLogRecordFactory()
    if getattr(factory, _MASKED, False):
        return

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        masking.filter(record)
        return record

    setattr(masked_record, _MASKED, True)
    logging.setLogRecordFactory(masked_record)
