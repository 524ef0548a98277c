"""What every transport refuses: bad steps, names, attributes, arguments, a second writer."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

import dataplane as dp
from dataplane.registry import resolve
from dataplane.testing.base import Hooks
from dataplane.testing.helpers import Consumer, assert_same_array


class RefusalTests(Hooks):
    """Bad input refused whole, with dataplane's own errors; one writer per channel."""

    def test_bad_step_is_refused_whole(self, url: str) -> None:
        c = Consumer(self.subscribe(url))
        c.start()
        with self.publish(url) as pub:
            with pytest.raises(dp.SchemaError, match="object"):
                pub.write({"a": np.zeros(3), "b": np.array([None, 1], dtype=object)})
            assert pub.write({"a": np.ones(3), "b": np.zeros(2)}) == 0
        c.finish(self.timeout)
        c.sub.close()
        assert c.indices == [0]
        assert sorted(c.steps[0][2]) == ["a", "b"]
        assert_same_array(c.steps[0][2]["a"], np.ones(3))

    def test_dtype_change_is_refused(self, url: str) -> None:
        with self.publish(url, subscribers=0) as pub:
            pub.write({"u": np.zeros(3, np.float64)})
            with pytest.raises(dp.SchemaError, match=r"float64 in step 0 but float32 in step 1"):
                pub.write({"u": np.zeros(3, np.float32)})
            pub.write({"u": np.ones(3, np.float64)})

    def test_changing_variables_and_shapes(self, url: str) -> None:
        """Transports declare whether a step may change the layout; either way nothing is lost."""
        steps = [
            {"a": np.arange(3.0)},
            {"a": np.arange(5.0), "b": np.int8(7)},
            {"b": np.int8(8)},
        ]
        sub = self.subscribe(url)
        c = Consumer(sub)
        c.start()
        with self.publish(url) as pub:
            pub.write(steps[0])
            if getattr(self.transport, "supports_changing_layout", True):
                pub.write(steps[1])
                pub.write(steps[2])
                want = steps
            else:
                for bad in steps[1:]:
                    with pytest.raises(dp.SchemaError, match="same variables and shapes"):
                        pub.write(bad)
                pub.write({"a": np.arange(3.0) + 1})
                want = [steps[0], {"a": np.arange(3.0) + 1}]
        c.finish(self.timeout)
        sub.close()
        assert c.outcome == "closed" and c.indices == list(range(len(want)))
        for (_, _, got), expected in zip(c.steps, want):
            assert sorted(got) == sorted(expected)
            for name, value in expected.items():
                assert_same_array(got[name], np.asarray(value))

    @pytest.mark.parametrize(
        "value",
        [
            np.array([None, 1], dtype=object),
            np.array(["a", "b"]),
            np.array([b"x"]),
            np.zeros(2, dtype=[("a", "f4")]),
            np.array(["2020-01-01"], dtype="datetime64[D]"),
            "a string",
            {"a": 1},
            np.ma.masked_array([1.0, 2.0], mask=[False, True]),
            np.ma.masked_array([1.0, 2.0]),
        ],
        ids=[
            "object",
            "unicode",
            "bytes",
            "structured",
            "datetime",
            "str",
            "dict",
            "masked",
            "masked-none",
        ],  # fmt: skip
    )
    def test_non_numeric_data_is_refused(self, url: str, value: Any) -> None:
        """Nothing that a transport would store as something else: objects (pickling),
        strings, records, dates, and masked arrays (no transport keeps the mask)."""
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError):
                pub.write({"x": value})

    @pytest.mark.parametrize(
        "name",
        [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "x" * 200,
            "a b",
            "é",
            "__dpx",
            "a\0b",
            3,
            None,
            "__dataplane",
            "__x",
            "zarr.json",
            "u.JSON",
        ],  # fmt: skip
    )
    def test_unsafe_variable_names_are_refused(self, url: str, name: Any) -> None:
        """One rule for every transport, so a name one accepts all others can store."""
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="name"):
                pub.write({name: np.zeros(1)})
            with pytest.raises(dp.SchemaError, match="name"):
                pub.write({"x": np.zeros(1)}, attrs={name: 1})

    def test_duplicate_names_are_refused(self, url: str) -> None:
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="twice"):
                pub.write([("u", np.zeros(2)), ("u", np.ones(2))])

    @pytest.mark.parametrize(
        "value",
        [{"a": 1}, None, [[1, 2]], [1, "a"], object(), 2**70, b"bytes"],
        ids=["dict", "none", "nested", "mixed", "object", "huge-int", "bytes"],
    )
    def test_bad_attribute_values_are_refused(self, url: str, value: Any) -> None:
        with self.publish(url, subscribers=0) as pub:
            with pytest.raises(dp.SchemaError, match="attribute"):
                pub.write({"x": np.zeros(1)}, attrs={"a": value})
            with pytest.raises(dp.SchemaError, match="attribute"):
                pub.attrs["a"] = value

    def test_bad_arguments_are_refused(self, url: str) -> None:
        with pytest.raises(dp.OptionError, match="policy"):
            dp.publish(url, policy="sometimes")
        with pytest.raises(dp.OptionError, match="queue_limit"):
            dp.publish(url, queue_limit=0)
        with pytest.raises(dp.OptionError, match="queue_limit"):
            dp.publish(url, queue_limit=10**9)
        with pytest.raises(dp.OptionError, match="start"):
            dp.subscribe(url, start="middle")
        with pytest.raises(dp.OptionError, match="timeout"):
            dp.subscribe(url, timeout=-1)
        with pytest.raises(TypeError, match="no_such_option"):
            dp.publish(url, no_such_option=1)
        sep = "&" if "?" in url else "?"
        with pytest.raises(dp.UnknownOptionError, match="bogus"):
            dp.subscribe(f"{url}{sep}bogus=1")
        with pytest.raises(dp.OptionError, match="mode"):
            dp.publish(url, mode="x")

    def test_unknown_scheme_lists_the_known_ones(self) -> None:
        with pytest.raises(dp.UnknownSchemeError) as info:
            dp.publish("nosuch://x")
        assert f"{self.scheme}://" in str(info.value)
        assert isinstance(info.value, ValueError)

    def test_one_writer_per_channel(self, url: str) -> None:
        with self.publish(url, subscribers=0):
            with pytest.raises(dp.ChannelBusyError, match="writer"):
                dp.publish(url)

    def test_transport_pickles_as_how_to_reopen(self, url: str) -> None:
        import pickle

        parsed, cls = resolve(url)
        t = cls.from_url(parsed, {})
        again = pickle.loads(pickle.dumps(t))
        assert type(again) is cls and again.url == t.url and again.options == t.options
        json.dumps(t.get_config())
