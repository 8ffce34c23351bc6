"""A real S3 API on 127.0.0.1 (moto's server mode) for the storage tests and ``make rehearsal``.

The run's storage is then given as a user gives MinIO or any S3-compatible store: pyarrow's URI
parameters ``s3://BUCKET/PREFIX?endpoint_override=HOST:PORT&scheme=http``. Credentials are dummy
values in the environment (moto accepts any); processes started afterwards (Ray nodes, the search
subprocess) inherit them.
"""
from __future__ import annotations

import contextlib
import logging
import os

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_storage(bucket: str = "steel-ray", prefix: str = "runs", log_file=None):
    """Start moto's S3 server on a free port with an empty bucket; yields the ``--storage`` URI.
    The server's own log (werkzeug: a request cut off by a killed node, say) goes to ``log_file``
    when given, else only its warnings and errors to the root logger."""
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    wz = logging.getLogger("werkzeug")
    wz.setLevel(logging.WARNING)  # one line per request otherwise
    handler = None
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        wz.addHandler(handler)
        wz.propagate = False
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/{prefix}?endpoint_override={host}:{port}&scheme=http"
    finally:
        server.stop()
        if handler is not None:
            wz.removeHandler(handler)
            handler.close()
            wz.propagate = True
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def list_keys(uri: str, under: str = "") -> list[str]:
    """Every object key below ``uri`` (+ ``under``), relative to it, sorted."""
    import pyarrow.fs as pafs

    from steel_ray.run import join_uri

    fs, root = pafs.FileSystem.from_uri(join_uri(uri, under) if under else uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sorted(os.path.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File)
