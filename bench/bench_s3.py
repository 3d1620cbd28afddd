"""Benchmark object-storage discovery and deletion against plain S3 client loops (issue 14).

    python bench/bench_s3.py [--checkpoints 10000] [--delete 1000] [--repeat 5]
    (`bench/run_all.py --quick` runs it with --checkpoints 1000 --repeat 2: 250 deleted a side)

Starts moto's S3 server on 127.0.0.1 (the one the tests use; `pip install -e '.[test]'`),
uploads N Hugging Face-style checkpoints of 3 small objects each (`checkpoint-<step>/`
trainer_state.json, model.safetensors, optimizer.pt), then measures through ONE botocore
client, so that both sides pay the same connection and signing costs:

- listing and planning: ckptd's first poll of the root (one recursive listing, grouped into
  checkpoints with sizes, times and markers) plus `policies.plan` on the result, against a
  plain paginated `list_objects_v2` loop collecting every key (`aws s3 ls --recursive`).
  Target: <= 1.5x.
- listing and planning as `ckptd plan` does it (`planner.plan_remote`: the one recursive
  listing turned into a read-only FileSystem, the unchanged local scan over it, the tiered
  policy, the safety protections), against the same plain loop. Target: <= 1.5x.
- a poll after one new checkpoint: requests made (top level + the new one) and time.
- deletion of D checkpoints through ckptd's path (versioning check, journal object, markers
  first, then the rest in batches of 1,000, journal removed) against a plain batched
  `delete_objects` of the same number of keys. Each repetition deletes different checkpoints
  of the same shape, alternating which side goes first. Target: <= 1.2x.

The best of `--repeat` runs of each is compared (the machine is shared). Prints the figures;
exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.config import Config, RootConfig
from daemon.planner import plan_remote
from daemon.storage import open_store
from daemon.storage.journal import delete_checkpoints
from daemon.storage.listing import Poller, RemoteCheckpoint
from daemon.storage.s3 import S3Store
from policies import PRESETS, Checkpoint, plan
from tests.s3server import S3Bucket, S3Server, make_client

LIST_RATIO_TARGET = 1.5
DELETE_RATIO_TARGET = 1.2
FILES = {
    "trainer_state.json": b'{"log_history": [], "pad": "........."}',
    "model.safetensors": b"m" * 200,
    "optimizer.pt": b"o",
}
MARKERS = frozenset({"trainer_state.json"})
STEP = re.compile(r"checkpoint-(\d+)$")


def upload(bucket: S3Bucket, steps: range) -> float:
    client = make_client(bucket.endpoint)
    keys = [(f"run/checkpoint-{s}/{name}", body) for s in steps for name, body in FILES.items()]
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(lambda kv: client.put_object(Bucket=bucket.name, Key=kv[0], Body=kv[1]), keys)
        )
    return time.perf_counter() - started


def plain_listing(store: S3Store, bucket: str) -> int:
    """`aws s3 ls --recursive`: every key of the root, page by page, through the same client."""
    count, arguments = 0, {"Bucket": bucket, "Prefix": "run/"}
    while True:
        page = store._client.list_objects_v2(**arguments)
        count += sum(1 for _item in page.get("Contents", ()))
        if not page.get("IsTruncated"):
            return count
        arguments["ContinuationToken"] = page["NextContinuationToken"]


def to_policy(checkpoint: RemoteCheckpoint, now: float) -> Checkpoint:
    match = STEP.match(checkpoint.name)
    reason = checkpoint.incomplete_reason(now, settle_seconds=0)
    return Checkpoint(
        name=checkpoint.name,
        step=int(match.group(1)) if match else 0,
        layout="hf",
        complete=reason is None,
        incomplete_reason=reason,
        size_bytes=checkpoint.size,
        freeable_bytes=checkpoint.size,
        mtime=checkpoint.mtime,
    )


def ckptd_listing_and_plan(store: S3Store, bucket: S3Bucket) -> tuple[int, Poller]:
    url, _ = open_store(bucket.url("run"), bucket.options)
    poller = Poller(store, url, MARKERS)
    now = time.time()
    found = poller.poll(now)
    planned = plan([to_policy(c, now) for c in found.values()], {"default": PRESETS["balanced"]})
    return len(planned.decisions), poller


def best(runs: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(runs))


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure_listing(store: S3Store, bucket: S3Bucket, count: int, repeat: int) -> float:
    objects = count * len(FILES)
    assert plain_listing(store, bucket.name) == objects
    decisions, _poller = ckptd_listing_and_plan(store, bucket)
    assert decisions == count, decisions
    plain = best(repeat, lambda: timed(lambda: plain_listing(store, bucket.name)))
    ours = best(repeat, lambda: timed(lambda: ckptd_listing_and_plan(store, bucket)))
    ratio = ours / plain
    print(f"listing {objects:,} objects ({count:,} checkpoints), best of {repeat}:")
    print(f"  plain list_objects_v2 loop   {plain:8.3f} s")
    print(
        f"  ckptd poll + group + plan    {ours:8.3f} s   ratio {ratio:.2f}"
        f"  target <= {LIST_RATIO_TARGET}: {'ok' if ratio <= LIST_RATIO_TARGET else 'MISS'}"
    )
    return ratio


def ckptd_plan(store: S3Store, bucket: S3Bucket) -> int:
    """`ckptd plan`'s path for an s3:// root: list once, scan as a local root, plan."""
    url, _ = open_store(bucket.url("run"), bucket.options)
    root = RootConfig(path=bucket.url("run"), storage_options=bucket.options)
    config = Config.model_validate(
        {"defaults": {"settle_seconds": 0}, "verify": {"checks": False}, "roots": []}
    )
    planned = plan_remote(config, root, now=time.time(), store=store, url=url)
    return len(planned.planned.plan.decisions)


def measure_plan(store: S3Store, bucket: S3Bucket, count: int, repeat: int) -> float:
    assert ckptd_plan(store, bucket) == count
    plain = best(repeat, lambda: timed(lambda: plain_listing(store, bucket.name)))
    ours = best(repeat, lambda: timed(lambda: ckptd_plan(store, bucket)))
    ratio = ours / plain
    print(f"`ckptd plan` of the s3:// root ({count:,} checkpoints), best of {repeat}:")
    print(f"  plain list_objects_v2 loop   {plain:8.3f} s")
    print(
        f"  list + scan + plan           {ours:8.3f} s   ratio {ratio:.2f}"
        f"  target <= {LIST_RATIO_TARGET}: {'ok' if ratio <= LIST_RATIO_TARGET else 'MISS'}"
    )
    return ratio


def measure_poll(store: S3Store, bucket: S3Bucket, count: int) -> None:
    _decisions, poller = ckptd_listing_and_plan(store, bucket)
    upload(bucket, range(count + 1, count + 2))
    store.requests.clear()
    seconds = timed(lambda: poller.poll(time.time()))
    print(
        f"poll after one new checkpoint: {sum(store.requests.values())} list requests"
        f" (top level {-(-(count + 1) // 1000)} pages + 1), {seconds:.3f} s"
    )
    store._client.delete_objects(
        Bucket=bucket.name,
        Delete={"Objects": [{"Key": f"run/checkpoint-{count + 1}/{n}"} for n in FILES]},
    )


def delete_ours(store: S3Store, bucket: S3Bucket, doomed: list[RemoteCheckpoint]) -> float:
    """ckptd's path: versioning check, journal, markers first, the rest in batches."""
    url, _ = open_store(bucket.url("run"), bucket.options)
    units = [checkpoint.to_delete() for checkpoint in doomed]
    started = time.perf_counter()
    run = delete_checkpoints(store, url, units)
    elapsed = time.perf_counter() - started
    if not run.journal_removed or not all(outcome.complete for outcome in run.outcomes):
        raise SystemExit("ckptd's delete path left something behind")
    return elapsed


def delete_plain(store: S3Store, bucket: S3Bucket, doomed: list[RemoteCheckpoint]) -> float:
    """A plain batched delete_objects of the same keys, 1,000 a request."""
    keys = [item.key for checkpoint in doomed for item in checkpoint.objects]
    started = time.perf_counter()
    for start in range(0, len(keys), 1000):
        objects = [{"Key": key} for key in keys[start : start + 1000]]
        answer = store._client.delete_objects(
            Bucket=bucket.name, Delete={"Objects": objects, "Quiet": True}
        )
        if answer.get("Errors"):
            raise SystemExit(f"plain delete failed: {answer['Errors'][:3]}")
    return time.perf_counter() - started


def measure_delete(store: S3Store, bucket: S3Bucket, count: int, delete: int, repeat: int) -> float:
    _decisions, poller = ckptd_listing_and_plan(store, bucket)
    found = poller.known
    rows = []
    for round_number in range(repeat):
        base = 1 + 2 * round_number * delete
        first = [found[f"checkpoint-{s}"] for s in range(base, base + delete)]
        second = [found[f"checkpoint-{s}"] for s in range(base + delete, base + 2 * delete)]
        if round_number % 2 == 0:
            ours, plain = delete_ours(store, bucket, first), delete_plain(store, bucket, second)
        else:
            plain, ours = delete_plain(store, bucket, first), delete_ours(store, bucket, second)
        rows.append((ours, plain))
    ours, plain = min(r[0] for r in rows), min(r[1] for r in rows)
    ratio = ours / plain
    keys = delete * len(FILES)
    print(f"deleting {delete:,} checkpoints ({keys:,} objects), best of {repeat}:")
    for number, (o, p) in enumerate(rows, 1):
        print(f"  round {number}: plain {p:.3f} s, ckptd {o:.3f} s, ratio {o / p:.2f}")
    print(f"  plain batched delete_objects {plain:8.3f} s")
    print(
        f"  ckptd journalled, marker-first {ours:6.3f} s   ratio {ratio:.2f}"
        f"  target <= {DELETE_RATIO_TARGET}: {'ok' if ratio <= DELETE_RATIO_TARGET else 'MISS'}"
    )
    return ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=10_000)
    parser.add_argument(
        "--delete", type=int, default=None, help="default: 1,000, fewer for a small --checkpoints"
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if args.delete is None:
        # Each round deletes 2 x --delete checkpoints (ckptd's and the plain side's).
        args.delete = max(1, min(1_000, args.checkpoints // (2 * args.repeat)))
    if 2 * args.delete * args.repeat > args.checkpoints:
        parser.error("--checkpoints must be at least 2 x --delete x --repeat")
    server = S3Server()
    problem = server.wait_ready()
    if problem is not None:
        print(problem)
        return 1
    try:
        bucket = S3Bucket(endpoint=server.endpoint, name="bench-s3")
        make_client(server.endpoint).create_bucket(Bucket=bucket.name)
        seconds = upload(bucket, range(1, args.checkpoints + 1))
        print(
            f"uploaded {args.checkpoints * len(FILES):,} objects in {seconds:.1f} s"
            f" (moto on {server.endpoint})"
        )
        _url, store = open_store(bucket.url("run"), bucket.options)
        assert isinstance(store, S3Store)
        list_ratio = measure_listing(store, bucket, args.checkpoints, args.repeat)
        plan_ratio = measure_plan(store, bucket, args.checkpoints, args.repeat)
        list_ratio = max(list_ratio, plan_ratio)
        measure_poll(store, bucket, args.checkpoints)
        delete_ratio = measure_delete(store, bucket, args.checkpoints, args.delete, args.repeat)
    finally:
        server.stop()
    return 0 if list_ratio <= LIST_RATIO_TARGET and delete_ratio <= DELETE_RATIO_TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
