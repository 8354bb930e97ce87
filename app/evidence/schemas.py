from __future__ import annotations

from pydantic import Field

from app.core.schemas import Schema


class SignedCertificate(Schema):
    payload: dict = Field(description="What is attested; the signature covers its canonical JSON.")
    algorithm: str
    key_id: str = Field(description="Names the public key served at /v1/keys/certificate-signing.")
    signature: str = Field(description="Base64 Ed25519 signature of the payload's canonical JSON.")


class SigningKeyOut(Schema):
    algorithm: str
    key_id: str
    public_key_pem: str
