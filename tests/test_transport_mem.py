"""mem:// passes the conformance suite."""

from dataplane.testing import conformance


class TestMem(conformance("mem")):
    def writer_options(self, subscribers):
        return {"rendezvous": subscribers}
