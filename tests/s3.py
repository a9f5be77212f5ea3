"""A real S3-compatible server on loopback for the tests: moto in server mode.

The server runs in a thread of the test process, listens on 127.0.0.1 only, and is
reached through pyarrow exactly as a user's S3 or MinIO store is. ``environment``
gives the variables a client needs: fake credentials, the endpoint, and no lookups
of ~/.aws or the EC2 metadata service, so no request leaves the machine.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_bucket_numbers = itertools.count()


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>

    def environment(self, scratch: Path) -> dict[str, str]:
        """What a client needs to reach this server; ``scratch`` stands in for ~/.aws."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(scratch / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "aws-credentials"),
        }

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return its URI."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def new_bucket(self) -> str:
        """A bucket no other test uses, as a URI."""
        return self.create_bucket(f"bucket-{next(_bucket_numbers)}")


@contextmanager
def s3_server() -> Iterator[S3Server]:
    """Run moto's S3 server on a free port of 127.0.0.1 for the duration of the block."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
