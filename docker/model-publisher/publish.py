"""Publish a Triton model repository to object storage over the S3 API.

Run by the chart's post-install/post-upgrade Job (image: docker/model-publisher.Dockerfile).
Credentials and region come from the standard AWS_* environment (the chart's Secret).
Idempotent: an object whose size and MD5 (the ETag of a single-part upload) already match
is not uploaded again, so re-running after an upgrade moves only what changed. Objects
under the prefix that the repository no longer has are left alone (Triton loads only the
models named on its command line); --delete-stale removes them.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

SKIPPED_PARTS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc"}


@dataclass(frozen=True)
class Item:
    path: Path
    key: str
    size: int
    md5: str


def plan(source: Path, prefix: str) -> list[Item]:
    """Every file of the repository with its object key (prefix/relative path)."""
    if not (source.is_dir() and any(source.glob("*/config.pbtxt"))):
        raise SystemExit(f"publish: {source} is not a Triton model repository (no */config.pbtxt)")
    items = []
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        relative = path.relative_to(source)
        if SKIPPED_PARTS & set(relative.parts) or path.suffix in SKIPPED_SUFFIXES:
            continue
        key = "/".join(filter(None, [prefix.strip("/"), relative.as_posix()]))
        data = path.read_bytes()
        items.append(Item(path, key, len(data), hashlib.md5(data).hexdigest()))
    return items


def publish(client, bucket: str, prefix: str, items: list[Item], delete_stale: bool = False) -> dict[str, int]:
    existing: dict[str, tuple[int, str]] = {}
    paginator = client.get_paginator("list_objects_v2")
    listing_prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
    for page in paginator.paginate(Bucket=bucket, Prefix=listing_prefix):
        for obj in page.get("Contents", []):
            existing[obj["Key"]] = (obj["Size"], obj["ETag"].strip('"'))
    counts = {"uploaded": 0, "unchanged": 0, "deleted": 0}
    for item in items:
        if existing.get(item.key) == (item.size, item.md5):
            counts["unchanged"] += 1
            continue
        with item.path.open("rb") as body:
            client.put_object(Bucket=bucket, Key=item.key, Body=body, ContentLength=item.size)
        counts["uploaded"] += 1
    if delete_stale:
        stale = sorted(set(existing) - {item.key for item in items})
        for start in range(0, len(stale), 1000):  # DeleteObjects takes at most 1000 keys
            chunk = stale[start:start + 1000]
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})
        counts["deleted"] = len(stale)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, required=True, help="the model repository folder")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="model_repository", help="key prefix inside the bucket")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (Ceph RGW, MinIO); default AWS")
    parser.add_argument("--delete-stale", action="store_true", help="remove objects the repository no longer has")
    args = parser.parse_args(argv)

    import boto3

    items = plan(args.source, args.prefix)
    client = boto3.client("s3", endpoint_url=args.endpoint_url)
    counts = publish(client, args.bucket, args.prefix, items, args.delete_stale)
    print(f"publish: s3://{args.bucket}/{args.prefix.strip('/')}: {len(items)} files, "
          + ", ".join(f"{v} {k}" for k, v in counts.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
