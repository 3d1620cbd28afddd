"""One pruner per root on object storage: the lease object, through conditional writes, on a
real S3-compatible server (moto) on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from daemon.lease import LEASE_NAME, LeaseError, LeaseInfo, ObjectLease
from daemon.storage import open_store
from daemon.storage.s3 import S3Store
from daemon.storage.url import StorageUrl
from tests.integration.test_lease import T0, Contenders
from tests.s3server import S3Bucket

# The server fixtures (imported under their own names, so pytest finds them here).
from tests.s3server import s3_bucket as s3_bucket
from tests.s3server import s3_endpoint as s3_endpoint


def opened(bucket: S3Bucket, prefix: str = "run") -> tuple[StorageUrl, S3Store]:
    url, store = open_store(bucket.url(prefix), bucket.options)
    assert isinstance(store, S3Store)
    return url, store


def lease_on(bucket: S3Bucket, host: str = "") -> ObjectLease:
    url, store = opened(bucket)
    return ObjectLease(store, url, duration=60, skew=10, host=host)


def held_by(bucket: S3Bucket) -> LeaseInfo | None:
    _url, store = opened(bucket)
    return LeaseInfo.decode(store.read_small(f"run/{LEASE_NAME}"))


@pytest.fixture
def s3_contenders(s3_bucket: S3Bucket) -> Iterator[Contenders]:
    group = Contenders(4, s3_bucket.options)
    try:
        yield group
    finally:
        group.close()


def test_four_processes_race_for_a_new_lease_object_and_exactly_one_wins(
    s3_bucket: S3Bucket, s3_contenders: Contenders
) -> None:
    for round_number in range(6):
        url = s3_bucket.url(f"root{round_number}")
        answers = s3_contenders.race("s3", url, T0)
        winners = [token for won, token in answers if won]
        assert len(winners) == 1, answers
        _url, store = opened(s3_bucket)
        holder = LeaseInfo.decode(store.read_small(f"root{round_number}/{LEASE_NAME}"))
        assert holder is not None and holder.token == winners[0]
        # The probe objects are gone: only the lease is left.
        assert [e.name for e in store.list_top(f"root{round_number}/")] == [LEASE_NAME]


def test_four_processes_race_to_take_over_an_expired_lease_object_and_one_wins(
    s3_bucket: S3Bucket, s3_contenders: Contenders
) -> None:
    for round_number in range(6):
        url, store = open_store(s3_bucket.url(f"root{round_number}"), s3_bucket.options)
        assert ObjectLease(store, url, duration=60, skew=10).acquire(T0)
        answers = s3_contenders.race("s3", str(url), T0 + 1000)
        winners = [token for won, token in answers if won]
        assert len(winners) == 1, answers
        holder = LeaseInfo.decode(store.read_small(url.key(LEASE_NAME)))
        assert holder is not None and holder.token == winners[0]


def test_the_lease_object_is_handed_over_only_after_expiry(s3_bucket: S3Bucket) -> None:
    first = lease_on(s3_bucket, host="node-a")
    second = lease_on(s3_bucket, host="node-b")
    assert first.acquire(T0)
    assert not second.acquire(T0 + 30)
    assert not second.acquire(T0 + 69)
    holder = second.holder()
    assert holder is not None and (holder.host, holder.expires) == ("node-a", T0 + 60)
    assert second.acquire(T0 + 71)
    assert not first.renew(T0 + 72) and not first.valid(T0 + 72)
    holder = held_by(s3_bucket)
    assert holder is not None and holder.host == "node-b"


def test_the_lease_object_is_renewed_and_released(s3_bucket: S3Bucket) -> None:
    holder = lease_on(s3_bucket)
    other = lease_on(s3_bucket)
    assert holder.acquire(T0)
    assert holder.renew(T0 + 20)
    assert not other.acquire(T0 + 75), "renewed until T0 + 80"
    assert holder.renew(T0 + 75)
    holder.release()
    assert other.holder() is None
    assert other.acquire(T0 + 76)


def test_a_server_that_ignores_conditional_writes_is_refused(s3_bucket: S3Bucket) -> None:
    url, store = opened(s3_bucket)

    def ignores_condition(key: str, data: bytes) -> bool:
        store.put(key, data)
        return True

    store.put_if_absent = ignores_condition  # type: ignore[method-assign]
    with pytest.raises(LeaseError, match="ignores conditional writes"):
        ObjectLease(store, url, duration=60, skew=10).acquire(T0)
    assert store.head(url.key(LEASE_NAME)) is None
