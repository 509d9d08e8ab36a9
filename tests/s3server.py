"""A real S3 API for the tests: moto's server mode on 127.0.0.1, one per test session.

Spark reaches it through the Hadoop S3A connector (path-style, no TLS) and the tests through boto3.
Credentials are fake and travel only in the standard AWS environment variables, the way a real
deployment passes them, so a test can check that they never show up in tables, logs or params.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from moto.server import ThreadedMotoServer

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a process needs to reach this server (S3A, boto3, MLflow)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    @property
    def spark_conf(self) -> dict[str, str]:
        """S3A settings for the session: endpoint and addressing only, never the keys."""
        return {
            "spark.hadoop.fs.s3a.endpoint": self.endpoint,
            "spark.hadoop.fs.s3a.endpoint.region": REGION,
            "spark.hadoop.fs.s3a.path.style.access": "true",
            "spark.hadoop.fs.s3a.connection.ssl.enabled": "false",
            "spark.hadoop.fs.s3a.aws.credentials.provider":
                "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider",
            # Fail fast on a broken test server instead of the default minutes of retries.
            "spark.hadoop.fs.s3a.attempts.maximum": "2",
            "spark.hadoop.fs.s3a.retry.limit": "2",
        }

    def client(self):  # -> botocore S3 client (untyped library)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )


def start() -> tuple[ThreadedMotoServer, S3Server]:
    """Start moto on a free loopback port; the keys are random so a leak is unambiguous."""
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(
        endpoint=f"http://{host}:{port}",
        access_key="AKIDTEST" + secrets.token_hex(6).upper(),
        secret_key="imageiq-test-secret-" + secrets.token_hex(12),
    )
    return server, s3


def upload_tree(s3: S3Server, local: Path, bucket: str, prefix: str) -> list[str]:
    """Upload every file under `local` to s3://bucket/prefix/<relative path>; returns the keys."""
    client = s3.client()
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(local).as_posix()}"
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def upload_source(s3: S3Server, local: Path, bucket: str) -> str:
    """Upload a folder of images under a fresh prefix; returns its s3a:// URI for `ingest.source`."""
    prefix = f"incoming-{secrets.token_hex(4)}"
    upload_tree(s3, local, bucket, prefix)
    return f"s3a://{bucket}/{prefix}"


def list_keys(s3: S3Server, bucket: str, prefix: str) -> Iterator[str]:
    paginator = s3.client().get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def export_env(s3: S3Server) -> None:
    """Put the AWS variables into this process's environment before the JVM starts (it inherits them)."""
    os.environ.update(s3.env)
