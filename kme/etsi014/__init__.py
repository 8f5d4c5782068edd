"""ETSI GS QKD 014 V1.1.1 messages: parsing, validation and JSON, transport-neutral.

One package holds the 014 rules (clauses 4 and 5 of the spec, sections 4, 5
and 7 of the spec note ``spec/etsi-gs-qkd-014.md``) for every side that
speaks 014: the node's northbound gateway, the QKD device emulator
(``lab.qkdsim``) and the southbound client (``kme.qkd``). Nothing here does
I/O or logs.

Server side::

    limits = KeyLimits(key_size=256, min_key_size=64, max_key_size=1024,
                       max_key_per_request=128, max_sae_id_count=0)
    req = parse_key_request_body(body, limits)      # or parse_key_request_query(args, limits)
    check_slaves(master, slave, req, limits)        # the [rec] checks of note 5.7
    ... take keys ...
    body = key_container(keys)

Client side: :func:`key_request_body`, :func:`key_ids_body`,
:func:`parse_key_container_body`, :func:`parse_status_body`.

Errors raise :class:`Etsi014Error` (a :class:`KmstnError`) whose ``code``
decides the HTTP status (``gateway/errors.py`` holds the one table) and whose
``public`` text is the exact ETSI message where the spec defines one
(``size shall be a multiple of 8``, ``one or more keys specified are not
found on KME``, ...). ``details`` is the optional Error ``details`` array.

Choices where the spec is silent (spec note section 6):

- ``number`` and ``size`` must be integers (JSON numbers with no fraction, or
  decimal digits in a query string); ``null`` counts as absent, as generated
  clients send it for unset fields.
- Unknown fields in a Key request or Key IDs body are refused (400): a typo
  such as ``numbr`` must not silently become the default of one key.
- ``extension_mandatory`` / ``extension_optional`` are accepted as an array
  of name/value objects (the spec) or as one plain object (nanoy42's client
  and others); a plain object is split into one-entry objects.
- The GET form of enc_keys takes only ``number`` and ``size``, each at most
  once; the GET form of dec_keys takes exactly one ``key_ID``.

The northbound gateway reads SAE requests with ``lenient=True`` (through
:func:`read_key_request` and :func:`read_key_ids`), because the clients people
run (PSK rotators, IPsec plugins, firewalls, conformance probes) differ where
the spec leaves room; the QKD device emulator stays strict, as the stricter
peer our southbound client must satisfy. Lenient means:

- ``dec_keys?key_ID=`` may name several IDs, repeated (``key_ID=a&key_ID=b``)
  or comma-separated (``key_ID=a,b``); all are read (never only the first)
  and the request is all-or-nothing like the POST form; duplicates are 400.
- In Key IDs (clause 4.4) unknown fields, at the top or in an entry, are
  ignored like the optional ``key_ID_extension`` and ``key_IDs_extension``:
  the body means only its key IDs, so nothing unknown can change what is
  taken.
- ``extension_optional`` that is not an array of objects (or one object) is
  ignored: clause 4.2 lets a KME ignore optional extensions whatever they hold.
- A POST without a body but with ``number``/``size`` (enc_keys) or
  ``key_ID`` (dec_keys) in the query is read as the GET form rather than as
  an empty request; a POST with both a body and a query string is 400, never
  half-read.

Strict still, because there a silent default would change what an SAE gets:
unknown fields of a Key request (``numbr`` must not become one key), unknown
query parameters, ``extension_mandatory`` of any shape or name we do not
implement (clause 4.2), and every number, size and UUID rule.

The parts, by the data formats of clause 4: ``_status`` (4.1 Status and the
limits it states), ``_request`` (4.2 Key request, Get key's two forms),
``_keys`` (4.3 Key container, 4.4 Key IDs) and ``_common`` (4.5 Error, the
spec's messages, strict JSON). Import from here.
"""

from kme.etsi014._common import (
    MEDIA_TYPE,
    MSG_EXT_MANDATORY_UNMET,
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_EXT_OPTIONAL_UNHANDLED,
    MSG_INSUFFICIENT_KEY,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_NOT_MULTIPLE_OF_8,
    MSG_UNAUTHORIZED,
    Etsi014Error,
    error_body,
    insufficient_key,
    keys_not_found,
    parse_error_body,
    permission_denied,
)
from kme.etsi014._keys import (
    MAX_KEY_IDS,
    key_container,
    key_ids_body,
    parse_key_container_body,
    parse_key_ids_body,
    parse_key_ids_query,
    read_key_ids,
)
from kme.etsi014._request import (
    MAX_EXTENSIONS,
    KeyRequest,
    check_extensions,
    check_slaves,
    extension_names,
    key_request_body,
    parse_key_request_body,
    parse_key_request_query,
    path_sae_id,
    read_key_request,
)
from kme.etsi014._status import KeyLimits, Status, parse_status_body, status_body

__all__ = [
    "MAX_EXTENSIONS",
    "MAX_KEY_IDS",
    "MEDIA_TYPE",
    "MSG_EXT_MANDATORY_UNMET",
    "MSG_EXT_MANDATORY_UNSUPPORTED",
    "MSG_EXT_OPTIONAL_UNHANDLED",
    "MSG_INSUFFICIENT_KEY",
    "MSG_KEYS_NOT_FOUND",
    "MSG_SIZE_NOT_MULTIPLE_OF_8",
    "MSG_UNAUTHORIZED",
    "Etsi014Error",
    "KeyLimits",
    "KeyRequest",
    "Status",
    "check_extensions",
    "check_slaves",
    "error_body",
    "extension_names",
    "insufficient_key",
    "key_container",
    "key_ids_body",
    "key_request_body",
    "keys_not_found",
    "parse_error_body",
    "parse_key_container_body",
    "parse_key_ids_body",
    "parse_key_ids_query",
    "parse_key_request_body",
    "parse_key_request_query",
    "parse_status_body",
    "path_sae_id",
    "permission_denied",
    "read_key_ids",
    "read_key_request",
    "status_body",
]
