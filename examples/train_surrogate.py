"""Use 2: train a surrogate on stored simulation output through the node-local cache.

A small convolutional network learns the heat equation's operator (``u -> du/dt``) from the
steps ``heat_after.py`` stored, for a few epochs: ``SampleDataset`` (one sample per step,
``sample="step"``) reads through a ``NodeCache`` on node-local disk that every DataLoader
worker (and every rank, and the next job) on the node shares, ``ShuffleSampler`` shuffles and
publishes each epoch's order so a prefetch process reads ahead and eviction knows the future.
Per epoch it prints samples/s, the loss and the cache's hit rate: the first epoch fetches each
shard from the file once, later ones come from the cache.

    mpiexec -n 2 python examples/heat_after.py --url h5:///tmp/heat.h5
    python examples/train_surrogate.py --url h5:///tmp/heat.h5 --cache /tmp/dpcache
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from dataplane.cache import NodeCache, cache_stats
from dataplane.loaders import SampleDataset, ShuffleSampler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="stored output, e.g. h5:///tmp/heat.h5")
    ap.add_argument("--cache", required=True, help="node-local cache directory")
    ap.add_argument("--capacity", default="2GB", help="cache capacity (default 2GB)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    args = ap.parse_args()
    torch.manual_seed(0)

    cache = NodeCache(args.cache, capacity=args.capacity)
    ds = SampleDataset(args.url, vars=("u", "dudt"), sample="step", cache=cache)
    sampler = ShuffleSampler(ds, seed=0, block=4)  # rank and world from MPI when launched so
    # Workers end with each epoch, and write their cache counters as they do (persistent
    # workers would save their start-up, and report their counters a while later).
    loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers)
    # The operator is a 3x3 stencil: a convolution can learn it exactly.
    model = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.zeros_(model.weight)  # start by predicting 0: a relative error of 1
    # Nine weights of a linear least-squares problem: a quasi-Newton step per batch.
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=5, history_size=10)
    print(f"{len(ds)} samples from {args.url}; cache {args.cache} ({args.capacity})")
    print(f"{'epoch':>5} {'samples/s':>10} {'rel. error':>10} {'cache hits':>11} {'from file':>10}")
    before = cache_stats(args.cache)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        t0, n, total = time.perf_counter(), 0, 0.0
        for u, dudt in loader:
            # The operator is linear: scale each field and its derivative alike to order 1.
            scale = u.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
            u, dudt = u / scale, dudt / scale

            def closure(u=u, dudt=dudt) -> torch.Tensor:
                opt.zero_grad()
                # squared error relative to the target's energy: 1 predicts 0, 0 is exact
                err = ((model(u[:, None]) - dudt[:, None]) ** 2).sum()
                loss = err / (dudt**2).sum().clamp_min(1e-12)
                loss.backward()
                return loss

            loss = closure()  # this batch's error before the step: what the model generalises
            opt.step(closure)
            n += len(u)
            total += float(loss.detach()) * len(u)
        seconds = time.perf_counter() - t0
        cache.flush_stats()
        now = cache_stats(args.cache)
        hits = now["hits"] - before["hits"]
        misses = now["misses"] - before["misses"]
        fetched = now["bytes_from_source"] - before["bytes_from_source"]
        before = now
        rate = hits / max(hits + misses, 1)
        print(
            f"{epoch:>5} {n / seconds:>10.0f} {total / n:>10.2e} {rate:>10.0%} "
            f"{fetched / 1e6:>8.1f}MB",
            flush=True,
        )
    ds.close()


if __name__ == "__main__":
    main()
