"""sst:// passes the conformance suite (real SST engines, WAN transport, real processes)."""

from dataplane.testing import conformance


class TestSST(conformance("sst")):
    def make_url(self, tmp_path, name):
        return f"sst://{tmp_path}/{name}"

    def writer_options(self, subscribers):
        return {"rendezvous": subscribers}
