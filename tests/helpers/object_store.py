"""A real S3-compatible server (moto) on 127.0.0.1, and the fault-injecting proxy in front of it, each a
process the test starts and stops by pid."""

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from helpers.processes import BIN, free_port, stop_group, wait_for_http

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}
PROXY = Path(__file__).parent / "faulty_proxy.py"


@contextlib.contextmanager
def moto_server(bucket: str):
    """Yield the endpoint of a moto server holding `bucket`."""
    port = free_port()
    server = subprocess.Popen([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{endpoint}/")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        stop_group(server)


def _boto_credentials() -> dict:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"], "region_name": CREDENTIALS["AWS_REGION"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


@dataclass
class FaultyStore:
    store: str
    """moto's endpoint, for the test's own reads and writes (no faults)."""
    endpoint: str
    """The proxy's endpoint, for the job."""
    log: Path
    proxy: subprocess.Popen

    def filesystem(self) -> pafs.S3FileSystem:
        """The bucket as the test sees it, straight from moto."""
        return pafs.S3FileSystem(endpoint_override=self.store, scheme="http", access_key="testing",
                                 secret_key="testing", region="us-east-1")

    def faults(self) -> dict[str, int]:
        """Requests the proxy answered so far, by what it did (`ok`, `throttled`, `dropped`, ...)."""
        counts: dict[str, int] = {}
        for line in self.log.read_text().splitlines():
            counts[line.split()[0]] = counts.get(line.split()[0], 0) + 1
        return counts

    def outage(self) -> None:
        """Begin an outage (every request dropped), or end the one going on."""
        os.kill(self.proxy.pid, signal.SIGUSR1)


@contextlib.contextmanager
def faulty_store(bucket: str, log: Path, fault_rate: float, hang_s: float = 3.0, seed: int = 0):
    """A moto server holding `bucket` behind a proxy that fails `fault_rate` of the requests."""
    with moto_server(bucket) as store:
        port = free_port()
        proxy = subprocess.Popen([sys.executable, str(PROXY), "--target", store, "--port", str(port),
                                  "--fault-rate", str(fault_rate), "--seed", str(seed), "--log", str(log),
                                  "--hang-s", str(hang_s)], start_new_session=True)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/")
            yield FaultyStore(store, f"http://127.0.0.1:{port}", log, proxy)
        finally:
            stop_group(proxy)
