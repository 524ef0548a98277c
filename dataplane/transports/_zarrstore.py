"""How ``zarr://`` talks to its fsspec store: which stores replace files atomically, retries
where they do not, the lease kept in the store, and the codecs option."""

from __future__ import annotations

import json
import time
from typing import Any

import zarr
import zarr.registry

from dataplane.errors import OptionError
from dataplane.transports._lease import LeaseIO

ATOMIC_PROTOCOLS = {"file", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"}
_RETRIES = 40  # metadata a writer is replacing in a non-atomic store: look again shortly
_RETRY_WAIT = 0.005


def retrying(fn: Any) -> Any:
    """Run ``fn``, retrying briefly: a half-written metadata object is a transient."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except Exception:
            if attempt == _RETRIES - 1:
                raise
            time.sleep(_RETRY_WAIT)


class FsspecLeaseIO(LeaseIO):
    def __init__(self, fs: Any, path: str) -> None:
        super().__init__(path)
        self.fs = fs

    def make_parents(self) -> None:
        if "/" in self.path.strip("/"):
            self.fs.makedirs(self.path.rstrip("/").rsplit("/", 1)[0], exist_ok=True)

    def read(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, data)


def parse_codecs(value: Any) -> Any:
    """Codec specs as zarr takes them; names and dicts are checked now, not at the first step."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value.startswith(("{", "[")):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise OptionError(f"compressors: {value!r} is not valid JSON ({exc})") from None
        else:
            value = {"name": value}
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, dict):
            item = {"configuration": {}, **item}
            try:
                zarr.registry.get_codec_class(item["name"]).from_dict(item)
            except (KeyError, TypeError, ValueError) as exc:
                raise OptionError(
                    f"compressors: {item!r} is not a zarr v3 codec this build knows "
                    f"(try 'zstd', 'blosc' or 'gzip'): {exc}"
                ) from None
        out.append(item)
    return out if isinstance(value, (list, tuple)) else out[0]
