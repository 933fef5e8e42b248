"""Which storage errors are transient, and how a storage operation is tried again (lmbatch/retrying.py).
The whole layer against a real S3-compatible server failing a share of its requests is in
tests/integration/test_object_store_faults.py."""

import pickle
import time

import pyarrow.fs as pafs
import pytest

from helpers.config import compose
from lmbatch import retrying
from lmbatch.config import ConfigError, StorageConfig
from lmbatch.plan.job import to_job_config
from lmbatch.retrying import RetryPolicy, retried, take_counts, transient_kind, until

FAST = RetryPolicy(attempts=4, base_delay_s=0.001, max_delay_s=0.002)

# What pyarrow's S3 filesystem said, against moto behind the fault proxy (and a wrong endpoint)
SEEN = [
    ("When uploading part for key 'k69' in bucket 'lake': AWS Error SLOW_DOWN during UploadPart operation: Please "
     "reduce your request rate.", "throttled"),
    ("When reading information for key 'k66' in bucket 'lake': AWS Error UNKNOWN (HTTP status 503) during "
     "HeadObject operation: No response body.", "server error"),
    ("When listing objects under key 'k65' in bucket 'lake': AWS Error NETWORK_CONNECTION during ListObjectsV2 "
     "operation: curlCode: 28, Timeout was reached; Details: Operation too slow.", "timeout"),
    ("When uploading part for key 'k67' in bucket 'lake': AWS Error NETWORK_CONNECTION during UploadPart operation: "
     "curlCode: 52, Server returned nothing (no headers, no data); Details: Empty reply from server", "connection"),
    ("When getting information for key 'k73' in bucket 'lake': AWS Error NETWORK_CONNECTION during HeadObject "
     "operation: curlCode: 8, Weird server reply; Details: Invalid status line", "connection"),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: Failed to flush response stream", "server error"),
    ("AWS Error UNKNOWN (HTTP status 429) during PutObject operation", "throttled"),
    # not transient: fail at once
    ("When initiating multiple part upload for key 'x' in bucket 'nobucket': AWS Error NO_SUCH_BUCKET during "
     "CreateMultipartUpload operation: The specified bucket does not exist", None),
    ("When getting information for key 'x' in bucket 'lake': AWS Error ACCESS_DENIED during HeadObject operation: "
     "Access Denied (HTTP status 403)", None),
    ("When getting information for key 'x' in bucket 'lake': AWS Error NETWORK_CONNECTION during HeadObject "
     "operation: curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:1", None),
    ("When getting information for key 'x' in bucket 'lake': AWS Error NETWORK_CONNECTION during HeadObject "
     "operation: curlCode: 6, Could not resolve hostname; Details: Could not resolve host: no-such-host.invalid", None),
]


@pytest.mark.parametrize("message,kind", SEEN, ids=[f"{k}-{i}" for i, (_, k) in enumerate(SEEN)])
def test_transient_errors_are_told_from_the_others(message, kind):
    assert transient_kind(OSError(message)) == kind


def test_python_errors_of_the_network_are_transient_and_missing_files_never():
    assert transient_kind(ConnectionResetError(104, "Connection reset by peer")) == "connection"
    assert transient_kind(TimeoutError("read timed out")) == "timeout"
    assert transient_kind(FileNotFoundError("HTTP status 503 in its name, still missing")) is None
    assert transient_kind(PermissionError("throttled?")) is None
    assert transient_kind(ValueError("not storage")) is None


def flaky(*errors, result="done"):
    """A call that raises `errors` one after the other, then returns `result`; its calls are counted."""
    calls = []

    def call():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return call, calls


def test_a_transient_fault_is_tried_again_and_counted_by_kind():
    take_counts()
    call, calls = flaky(OSError("AWS Error SLOW_DOWN during PutObject"), ConnectionResetError("reset by peer"))
    assert retried("write", call, FAST) == "done" and len(calls) == 3
    assert take_counts() == {"throttled": 1, "connection": 1} and take_counts() == {}


def test_what_is_not_transient_fails_at_the_first_attempt():
    call, calls = flaky(OSError("AWS Error NO_SUCH_BUCKET during PutObject"))
    with pytest.raises(OSError, match="^AWS Error NO_SUCH_BUCKET during PutObject$"):
        retried("write", call, FAST)
    assert len(calls) == 1


def test_a_fault_that_lasts_is_given_up_after_the_attempts_saying_so():
    call, calls = flaky(*[OSError("HTTP status 503")] * 10)
    with pytest.raises(OSError, match=r"^HTTP status 503 \(given up after 4 attempts in 0 s; storage.attempts "):
        retried("read", call, FAST)
    assert len(calls) == 4


def test_no_retry_waits_past_a_deadline():
    slow = RetryPolicy(attempts=100, base_delay_s=0.05, max_delay_s=0.05)
    call, calls = flaky(*[OSError("HTTP status 503")] * 100)
    with until(time.monotonic() + 0.2), pytest.raises(OSError, match="given up after"):
        retried("renew", call, slow)
    assert 2 <= len(calls) <= 6


def test_a_delete_whose_answer_was_lost_is_done():
    call, calls = flaky(ConnectionResetError("reset by peer"), FileNotFoundError("gone"))
    assert retried("delete", call, FAST, done_if_missing=True) is None and len(calls) == 2
    call, _ = flaky(FileNotFoundError("never there"))
    with pytest.raises(FileNotFoundError):  # missing at the first attempt: missing
        retried("delete", call, FAST, done_if_missing=True)


def test_backoff_doubles_up_to_its_cap_half_of_it_random():
    policy = RetryPolicy(base_delay_s=1, max_delay_s=5)
    for attempt, ceiling in [(1, 1), (2, 2), (3, 4), (4, 5), (9, 5)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(set(delays)) > 1


def test_only_remote_filesystems_are_wrapped_and_they_travel_with_their_policy(monkeypatch):
    assert isinstance(retrying.with_retries(pafs.LocalFileSystem()), pafs.LocalFileSystem)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3 = pafs.S3FileSystem(endpoint_override="http://127.0.0.1:9", region="us-east-1")
    policy = RetryPolicy(attempts=3, request_timeout_s=7)
    wrapped = pickle.loads(pickle.dumps(retrying.with_retries(s3, policy)))  # as it reaches a Ray worker
    assert wrapped.type_name == "py::retrying+s3"
    handler = wrapped.handler
    assert handler.policy == policy
    assert handler.fs.__reduce__()[1][0]["request_timeout"] == 7


def test_the_storage_group_is_the_policy_and_checks_its_values(tmp_path):
    assert StorageConfig().policy == RetryPolicy()  # one set of defaults
    job = to_job_config(compose("storage.attempts=3", "storage.max_delay_s=2", f"output.path={tmp_path}"))
    assert job.storage.policy == RetryPolicy(attempts=3, max_delay_s=2.0)
    for override, says in [("storage.attempts=0", "storage.attempts must be >= 1"),
                           ("storage.base_delay_s=30", "storage.base_delay_s must be between 0 and storage.max_delay"),
                           ("storage.request_timeout_s=0", "storage.request_timeout_s must be > 0")]:
        with pytest.raises(ConfigError, match=says):
            to_job_config(compose(override, f"output.path={tmp_path}"))
