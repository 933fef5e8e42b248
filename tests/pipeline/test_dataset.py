"""A chunk whose read hangs (a stale mount): the job stops, naming its files.
"""


import threading

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from helpers.config import compose
from helpers.data import write_prompts
from helpers.tally import TALLY
from lmbatch.input import chunks as lmbatch_chunks
from lmbatch.pipeline.dataset import ReadStalled, prepare_within
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.prepare.chunk import prepare_chunk


class HangingFileSystem(LocalFileSystem):
    """Local files behind a mount that stops answering: once `hung` is set, opening a file blocks
    until `released` is, as a read from a stale NFS mount blocks."""
    protocol = "hanging"
    hung, released = threading.Event(), threading.Event()

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("hanging://"))

    def _open(self, path, *args, **kwargs):
        if self.hung.is_set():
            self.released.wait()
        return super()._open(path, *args, **kwargs)


def test_a_read_that_hangs_stops_the_job_naming_its_files(tmp_path, tiny_llama):
    """A chunk whose input read does not return within cluster.stall_timeout_s stops the job (Ray
    Data reports the task's error, as for a file that cannot be read, above), naming the files."""
    fsspec.register_implementation("hanging", HangingFileSystem, clobber=True)
    source = write_prompts(tmp_path / "in.parquet", ["a prompt", "another one"])
    plan = plan_job(to_job_config(compose(f"input.path=hanging://{source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "cluster.num_replicas=1")))
    chunk = plan.chunks[0]
    assert prepare_within(chunk, plan.settings, [], timeout_s=30).equals(prepare_chunk(chunk, plan.settings))
    lmbatch_chunks._open_parquet.cache_clear()  # a prepare worker's process opens the file afresh
    HangingFileSystem.hung.set()
    try:
        with pytest.raises(ReadStalled, match=rf"reading chunk {chunk.id} of the input \(hanging://{source}\) did not "
                                              r"finish within cluster.stall_timeout_s=0.5 s: is its storage hung"):
            prepare_within(chunk, plan.settings, [], timeout_s=0.5)
    finally:
        HangingFileSystem.released.set()
    TALLY["bad_input_kinds"].add("a read that hangs")
