"""operator/objectstore.py: which endpoints get the operator's signature, URI parsing, and
the bound on cached clients. The network behaviour (cap, deadline, unsigned requests against
a hostile endpoint) is in tests/reliability/test_multitenant.py."""

from __future__ import annotations

import pytest

from lora_operator import objectstore
from lora_operator.settings import load_settings

BASE = load_settings()


def test_endpoints_are_compared_by_scheme_host_and_port() -> None:
    assert objectstore.normalize_endpoint("HTTPS://S3.Example.com/") == \
        objectstore.normalize_endpoint("https://s3.example.com:443")
    assert objectstore.normalize_endpoint("http://s3.example.com") != \
        objectstore.normalize_endpoint("http://s3.example.com:9000")
    assert objectstore.normalize_endpoint(None) is None


def test_only_the_operators_own_endpoint_is_signed_by_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    own = BASE.model_copy(update={"s3_endpoint": "http://seaweed.storage:8333"})
    assert objectstore.is_signed("http://seaweed.storage:8333/", own)
    assert not objectstore.is_signed("http://attacker.example:8333", own)
    assert not objectstore.is_signed(None, own)  # AWS itself is not the operator's storage here
    aws = BASE.model_copy(update={"s3_endpoint": None})
    assert objectstore.is_signed(None, aws)
    assert not objectstore.is_signed("https://minio.tenant:9000", aws)


def test_the_allow_list_replaces_the_default() -> None:
    s = BASE.model_copy(update={"s3_endpoint": "http://own:8333",
                                "signed_endpoints": ["https://shared-models.example.com"]})
    assert objectstore.is_signed("https://shared-models.example.com:443", s)
    assert not objectstore.is_signed("http://own:8333", s)


@pytest.mark.parametrize("uri", ["https://host/bucket/key", "s3://bucket", "s3://bucket/",
                                 "file:///etc/passwd"])
def test_only_s3_object_uris_are_read(uri: str) -> None:
    with pytest.raises(objectstore.NotAllowed):
        objectstore.split_uri(uri)


def test_client_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs naming ever new endpoints cannot grow the cache: the oldest client goes."""
    monkeypatch.setattr(objectstore, "CLIENT_CACHE_SIZE", 3)
    objectstore.clear_clients()
    for i in range(6):
        objectstore._client(f"http://tenant-{i}.example:9000", False, "us-east-1", 1.0)
    assert objectstore.cached_clients() == 3
    objectstore.clear_clients()
