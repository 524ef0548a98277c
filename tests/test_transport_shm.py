"""shm:// passes the conformance suite."""

from dataplane.testing import conformance


class TestShm(conformance("shm")):
    def writer_options(self, subscribers):
        return {"rendezvous": subscribers}
