"""Many stored channels read as one: a glob or a list of URLs, their steps one after another.

Training sets are often thousands of files written by many jobs. ``Sources`` gives the read
paths one archive-like object over all of them (``len``, ``[i]`` a step, ``version(i)``), so that
shards, the cache, the sampler and the prefetcher work on them as on one channel. Only the
files a read touches are open, at most ``OPEN_AT_ONCE`` per process.
"""

from __future__ import annotations

import glob
import os
import stat
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

import dataplane.api as api
from dataplane import _look
from dataplane._look import Described
from dataplane.errors import DataplaneError, OptionError
from dataplane.loaders._looks import SETTLED_S, Looks, identity
from dataplane.model import ChannelURL, Step

#: Files kept open per process (each an open HDF5/ADIOS2/zarr handle).
OPEN_AT_ONCE = 64
_GLOB = set("*?[")


def is_many(url: Any) -> bool:
    """Whether ``url`` names several channels (a list, or a path with a glob pattern)."""
    if isinstance(url, (list, tuple)):
        return True
    return isinstance(url, str) and "://" in url and bool(_GLOB & set(_path(url)))


def _path(url: str) -> str:
    return url.split("://", 1)[1].split("?", 1)[0]


def expand(url: Any) -> list[str]:
    """The channels ``url`` names, in order: a list as given, a glob's matches sorted."""
    if isinstance(url, (list, tuple)):
        urls = list(url)
        if not urls:
            raise OptionError("an empty list of URLs: give at least one channel to read")
        for u in urls:
            if not isinstance(u, str) or is_many(u):
                raise OptionError(f"a list of URLs holds channel URLs, got {u!r}")
            ChannelURL.parse(u)
        if len(set(urls)) != len(urls):
            dup = next(u for u in urls if urls.count(u) > 1)
            raise OptionError(f"{dup} is in the list twice: each channel is read once")
        return urls
    parsed = ChannelURL.parse(url)
    if parsed.protocol is not None:
        raise OptionError(
            f"{url}: a glob over a remote store ({parsed.protocol}) is not supported; list "
            f"the URLs instead"
        )
    scheme, query = url.split("://", 1)[0], url.split("?", 1)[1] if "?" in url else ""
    matches = sorted(glob.glob(parsed.path))
    if not matches:
        raise OptionError(f"{url} matches nothing (no file or directory {parsed.path})")
    return [f"{scheme}://{os.path.abspath(m)}" + (f"?{query}" if query else "") for m in matches]


def signature(url: str) -> str | None:
    """:func:`stat_signature` of a channel stored as one file; None for a directory (a BP5
    or zarr store changes inside without changing its own times) or no file."""
    st = _file_stat(url)
    return None if st is None else stat_signature(st)


def settled(url: str) -> str | None:
    """What a channel stored as one file looks like now (:func:`identity`), if it has been
    unchanged for ``SETTLED_S`` (None otherwise, or for a directory or no file). While it
    stays so, no step was committed since: a commit then would have moved its times past
    those (a change within one clock tick of the last one goes unseen only while that last
    one is recent)."""
    began = time.time_ns()
    st = _file_stat(url)
    if st is None or began - max(st.st_mtime_ns, st.st_ctime_ns) < SETTLED_S * 1e9:
        return None
    return identity(st)


def _file_stat(url: str) -> os.stat_result | None:
    try:
        st = os.stat(ChannelURL.parse(url).path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def stat_signature(st: os.stat_result) -> str:
    """What changes when a file does: size, modification time, inode (a file replaced)."""
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


class Sources:
    """The steps of ``urls`` one after another: ``len``, ``[i]``, ``version(i)``.

    ``counts`` are the steps of each file a snapshot took in before: every file but the last of
    them is fixed at that (steps it gained since would change every later step's number, so
    they are not read, with a warning); the last one, and files not in it, count as they are.
    """

    def __init__(
        self,
        urls: Sequence[str],
        opts: dict[str, Any],
        counts: Sequence[int],
        look: bool,
        sigs: Sequence[str | None] = (),
        versions: bool = False,
        locate: bool = False,
        looks: Looks | None = None,
    ) -> None:
        """``look=False``: ``counts`` covers every file (a worker reading a snapshot: no file
        is opened before a read needs it). ``sigs``: each file's :func:`signature` when the
        snapshot took it in; a fixed file whose signature is unchanged is not opened again
        (else every epoch would open every file).

        A look also describes each step it finds beyond ``counts`` (:meth:`described`; with
        its version if ``versions``, where its bytes lie if ``locate``: see ``_direct``) while
        its file is open, and closes the file at once: a
        look opens every file once, and taking the steps in afterwards reopened all but the
        last ``OPEN_AT_ONCE`` of them (an HDF5 close also costs more the more files are
        open: 0.3 ms alone, 1.2 ms beside 64 others). With ``looks`` (versions and places
        both), what an earlier job's look found of an unchanged file is taken from there."""
        self.urls = list(urls)
        self.opts = opts
        self._open: OrderedDict[int, api.Archive] = OrderedDict()
        self.sigs: list[str | None] = list(sigs)
        # file -> (first step described, each step's (variables, version, located))
        self._described: dict[int, tuple[int, list[Described]]] = {}
        if not look:
            seen = [int(c) for c in counts]
            assert len(seen) == len(self.urls)
        else:
            assert looks is None or (versions and locate)
            seen = self._look(counts, sigs, versions, locate, looks)
        self.counts = seen
        self.offsets = np.concatenate(([0], np.cumsum(seen, dtype=np.int64)))

    def _look(
        self,
        counts: Sequence[int],
        sigs: Sequence[str | None],
        versions: bool,
        locate: bool,
        looks: Looks | None,
    ) -> list[int]:
        """Count every file's steps and describe those beyond ``counts``; the counts."""
        self.sigs = []
        began = time.time_ns()
        stats: list[os.stat_result | None] = []
        kept: dict[int, tuple[int, list[Described]]] = {}
        jobs: list[_look.Job] = []
        for k, url in enumerate(self.urls):
            st = _file_stat(url)  # before looking: a change meanwhile shows next time
            stats.append(st)
            sig = None if st is None else stat_signature(st)
            self.sigs.append(sig)
            if k < len(counts) - 1 and sig is not None and k < len(sigs) and sigs[k] == sig:
                continue  # fixed, and unchanged
            known = int(counts[k]) if k < len(counts) else 0
            got = None if looks is None or st is None else looks.get(url, st)
            if got is not None:
                kept[k] = got
            else:
                jobs.append((k, url, known))
        found = _look.look_all(jobs, self.opts, versions, locate)
        seen = []
        for k, url in enumerate(self.urls):
            known = int(counts[k]) if k < len(counts) else 0
            if k in kept:
                now, steps = kept[k]
                steps = steps[known:]  # a kept look describes every step
            elif k in found:
                now, steps = found[k]
                st = stats[k]
                if looks is not None and st is not None and known == 0:
                    looks.put(url, st, steps, began)
            else:
                seen.append(known)  # fixed, and unchanged
                continue
            if k < len(counts) - 1 and now > known:
                warnings.warn(
                    f"{url} gained {now - known} steps after the dataset took it in; they "
                    f"are not read (only the last file of a dataset may grow, else every "
                    f"later step's number would change)",
                    RuntimeWarning,
                    stacklevel=5,
                )
                now = known
            self._described[k] = (known, steps[: max(0, now - known)])
            seen.append(now)
        if looks is not None:
            looks.prune()
        return seen

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def where(self, i: int) -> tuple[int, int]:
        """(file, step in the file) of step ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"step {i} is out of range: the files hold {len(self)} steps")
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return k, i - int(self.offsets[k])

    def __getitem__(self, i: int) -> Step:
        k, j = self.where(int(i))
        return self._archive(k)[j]

    def version(self, i: int) -> str | None:
        k, j = self.where(int(i))
        return self._archive(k).version(j)

    def described(self, i: int) -> Described | None:
        """(variables, version, located) of step ``i`` as the look found it, or None where the
        look did not describe it."""
        k, j = self.where(int(i))
        got = self._described.get(k)
        if got is None or not got[0] <= j < got[0] + len(got[1]):
            return None
        return got[1][j - got[0]]

    def _archive(self, k: int) -> api.Archive:
        arc = self._open.get(k)
        if arc is None:
            arc = self._open[k] = api.open(self.urls[k], **self.opts)
            while len(self._open) > OPEN_AT_ONCE:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(k)
        return arc

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_steps(
    url: Any,
    opts: dict[str, Any],
    files: list[str] | None,
    counts: list[int],
    look: bool = False,
    sigs: Sequence[str | None] = (),
    versions: bool = False,
    looks: Looks | None = None,
) -> Any:
    """The dataset's steps as one archive: ``url`` itself, or ``files`` one after another
    (``counts``: each file's steps in the snapshot; ``look``: count them anew, and locate
    their bytes; ``looks``: see :class:`Sources`)."""
    if files is None:
        return api.open(url, **opts)
    return Sources(files, opts, counts, look, sigs, versions, locate=look, looks=looks)


def grow(url: str, files: list[str]) -> None:
    """Append to ``files`` (in place: a snapshot shares the list) those the glob ``url``
    matches now and did not, in order."""
    now = expand(url)
    gone = [f for f in files if f not in now]
    if gone:
        raise DataplaneError(
            f"{gone[0]} was read as part of {url} and is gone; the dataset's samples "
            f"would change under the sampler's order: make a new dataset"
        )
    files += [f for f in now if f not in files]
