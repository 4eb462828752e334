"""A throwaway S3 for tests: moto's server on a free local port, reached by s3fs (what
`restage[cloud]` installs) through the standard AWS variables, so that every process a test
starts (a `restage` job, its Ray workers) reaches the same store. Skips naming the dev extra
when moto or s3fs is missing."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator

import pytest

INSTALL_HINT = "pip install -e '.[dev]' (moto[server] and s3fs)"


@contextlib.contextmanager
def local_s3() -> Iterator[dict[str, str]]:
    """The AWS variables of an S3 that lives for the block, also set in ``os.environ``."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"S3 tests need moto and s3fs ({exc}): {INSTALL_HINT}")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "restage-test",
        "AWS_SECRET_ACCESS_KEY": "restage-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    # fsspec keeps one S3FileSystem per set of arguments, with the endpoint it was made
    # with: an earlier block's, on a server gone since, unless dropped.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield env
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def new_bucket(env: dict[str, str]):
    """A fresh bucket -> (its s3:// root, a boto3 client of it: another process's writes)."""
    import boto3

    name = f"restage-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=name)
    return f"s3://{name}", client


def put(client, uri: str, body: bytes = b"{}") -> None:
    """Write ``body`` at ``uri`` with boto3, behind s3fs's back."""
    name, _, key = uri.removeprefix("s3://").partition("/")
    client.put_object(Bucket=name, Key=key, Body=body)
