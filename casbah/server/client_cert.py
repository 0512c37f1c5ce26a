r"""The identity an mTLS client certificate carries, read from the certificate itself.

gRPC also reports the subject and common name as strings (`x509_subject`,
`x509_common_name`), but those are C strings: a common name `build-farm\0x`
arrives as `build-farm`, so a certificate the CA issued for another name would
match an identity it was never given.  We therefore parse the PEM certificate
gRPC hands over (`x509_pem_cert`, already verified against the client CA by the
TLS handshake) and compare the attribute values as the certificate spells them.
A subject with NUL or any other control character is refused outright: no
legitimate name has one, and it could only serve to confuse a comparison or a
log line.

cryptography is imported on the first certificate, not with the module: every server
imports this one through `casbah.server.auth`, most never see a client certificate,
and cryptography.x509 costs about 20 ms of startup.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

from casbah.errors import Unauthenticated

if TYPE_CHECKING:
    from cryptography import x509


@functools.cache
def _openssl_names() -> dict:
    """OpenSSL's short names for attributes `rfc4514_attribute_name` spells as a dotted
    OID, so a configured DN written as `openssl x509 -subject` prints it still matches."""
    from cryptography.x509.oid import NameOID

    return {
        NameOID.EMAIL_ADDRESS: "emailAddress",
        NameOID.SERIAL_NUMBER: "serialNumber",
        NameOID.SURNAME: "SN",
        NameOID.GIVEN_NAME: "GN",
        NameOID.TITLE: "title",
        NameOID.INITIALS: "initials",
        NameOID.PSEUDONYM: "pseudonym",
        NameOID.GENERATION_QUALIFIER: "generationQualifier",
        NameOID.DN_QUALIFIER: "dnQualifier",
        NameOID.BUSINESS_CATEGORY: "businessCategory",
        NameOID.POSTAL_CODE: "postalCode",
        NameOID.JURISDICTION_COUNTRY_NAME: "jurisdictionC",
        NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: "jurisdictionST",
        NameOID.JURISDICTION_LOCALITY_NAME: "jurisdictionL",
        NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    }


@dataclass(frozen=True)
class CertificateSubject:
    #: (ATTRIBUTE in upper case, value) pairs, sorted: compared with `auth.parse_subject`'s form.
    pairs: tuple[tuple[str, str], ...]
    #: The subject's one common name; None when it has none or several (then only whole DNs match).
    common_name: str | None


def has_control_character(text: str) -> bool:
    """NUL, C0/C1 controls and DEL (Unicode category Cc)."""
    return any(unicodedata.category(char) == "Cc" for char in text)


def _attribute_name(attribute: x509.NameAttribute) -> str:
    name = _openssl_names().get(attribute.oid) or attribute.rfc4514_attribute_name
    return name.upper()


@functools.lru_cache(maxsize=1024)
def certificate_subject(pem: bytes) -> CertificateSubject:
    """The subject of a PEM certificate; Unauthenticated when it cannot be trusted as a name.

    Cached by the certificate's bytes: a client sends the same certificate on every call.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificate(pem)
        subject = certificate.subject
    except ValueError as exc:
        raise Unauthenticated(f"the client certificate cannot be parsed: {exc}") from None
    pairs: list[tuple[str, str]] = []
    common_names: list[str] = []
    for attribute in subject:
        name = _attribute_name(attribute)
        value = attribute.value
        if isinstance(value, bytes):  # a BIT STRING attribute (x500UniqueIdentifier): never a configured name
            value = "#" + value.hex()
        elif has_control_character(value):
            raise Unauthenticated(
                f"the client certificate's subject attribute {name} contains a control character "
                f"({value!r}): refused"
            )
        pairs.append((name, value))
        if attribute.oid == NameOID.COMMON_NAME:
            common_names.append(value)
    return CertificateSubject(tuple(sorted(pairs)), common_names[0] if len(common_names) == 1 else None)


def peer_certificate(auth_context: dict) -> bytes | None:
    """The verified client certificate gRPC reports for this call (PEM), or None."""
    values = auth_context.get("x509_pem_cert") or ()
    for value in values:
        return value if isinstance(value, bytes) else str(value).encode()
    return None
