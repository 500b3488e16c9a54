"""Client for the OCI distribution API (pull and push of manifests and blobs). See docs/registry.md."""

from converter.registry.auth import Credentials, load_docker_credentials
from converter.registry.client import (
    ACCEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobReader,
    Descriptor,
    Manifest,
    RegistryClient,
    RetryPolicy,
)
from converter.registry.errors import (
    AuthError,
    DeleteUnsupportedError,
    DigestMismatchError,
    InvalidReferenceError,
    NotFoundError,
    RegistryError,
    RegistryErrorDetail,
    RegistryPermanentError,
    RegistryTransientError,
    TLSError,
    UnsupportedManifestError,
)
from converter.registry.reference import Reference, parse_reference

__all__ = [
    "ACCEPT", "DOCKER_LIST", "DOCKER_MANIFEST", "MANIFEST_TYPES", "OCI_INDEX", "OCI_MANIFEST",
    "AuthError", "BlobReader", "Credentials", "DeleteUnsupportedError", "Descriptor", "DigestMismatchError",
    "InvalidReferenceError",
    "Manifest", "NotFoundError", "Reference", "RegistryClient", "RegistryError", "RegistryErrorDetail",
    "RegistryPermanentError", "RegistryTransientError", "RetryPolicy", "TLSError", "UnsupportedManifestError",
    "load_docker_credentials", "parse_reference",
]
