"""The hooks and building blocks every conformance test class shares."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest

import dataplane as dp
from dataplane.registry import get_transport
from dataplane.testing.helpers import Consumer, RemotePublisher
from dataplane.transports.base import Transport


class Hooks:
    """What a transport's test class sets (``scheme``; ``conformance()`` does) or overrides, and
    the building blocks of the tests."""

    scheme: ClassVar[str] = ""
    #: Upper bound of every wait in these tests, seconds.
    timeout: ClassVar[float] = 20.0

    # hooks ----------------------------------------------------------------------------------
    def make_url(self, tmp_path: Any, name: str) -> str:
        return f"{self.scheme}://{name}"

    def writer_options(self, subscribers: int) -> dict[str, Any]:
        """Options for ``publish`` when ``subscribers`` will attach (e.g. a rendezvous)."""
        return {}

    def reader_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def url(self, tmp_path: Any) -> str:
        return self.make_url(tmp_path, "c" + uuid.uuid4().hex[:12])

    @property
    def transport(self) -> type[Transport]:
        return get_transport(self.scheme)

    # building blocks ------------------------------------------------------------------------
    def subscribe(self, url: str, **kw: Any) -> dp.Subscriber:
        kw.setdefault("timeout", self.timeout)
        return dp.subscribe(url, **self.reader_options(), **kw)

    def publish(self, url: str, subscribers: int = 1, **kw: Any) -> Any:
        options = {**self.writer_options(subscribers), **kw}
        if not getattr(self.transport, "same_process_pairs", True):
            return RemotePublisher(url, **options)
        return dp.publish(url, **options)

    def roundtrip(
        self,
        url: str,
        steps: Sequence[tuple[Mapping[str, Any], Mapping[str, Any] | None]],
        *,
        subscribers: int = 1,
        channel_attrs: dict[str, Any] | None = None,
        sub_kwargs: dict[str, Any] | None = None,
        **pub_kwargs: Any,
    ) -> list[Consumer]:
        """Publish ``steps`` with ``subscribers`` live consumers; return the consumers."""
        consumers = [
            Consumer(self.subscribe(url, **(sub_kwargs or {}))) for _ in range(subscribers)
        ]
        for c in consumers:
            c.start()
        try:
            with self.publish(url, subscribers, **pub_kwargs) as pub:
                for key, value in (channel_attrs or {}).items():
                    pub.attrs[key] = value
                for data, attrs in steps:
                    pub.write(data, attrs)
            for c in consumers:
                c.finish(self.timeout)
        finally:
            for c in consumers:
                c.sub.close()
        return consumers

    def roundtrip_one(self, url: str, data: dict[str, Any], attrs: dict | None = None) -> dict:
        (c,) = self.roundtrip(url, [(data, attrs)])
        assert c.outcome == "closed", c.outcome
        assert c.indices == [0]
        return c.steps[0][2]
