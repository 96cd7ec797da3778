"""Approximate nearest-neighbour search on normalised embeddings (inner product): FAISS IVF (exact, 8-bit and
product-code distances, the latter two re-ranked exactly) and HNSW against exact search by numpy and by FAISS, all
measured in one process on the same data, queries and threads. Default: 1,000,000 x 512 (2 GB of float32).

Data: a mixture of `--centres` random unit centres with uneven weights (log-normal), each row its centre plus
Gaussian noise of norm about `--spread` (scaled per cluster by 0.5-1.5x), then L2-normalised (float32); with
the default spread 0.8 a row's cosine to its centre is about 0.8. The noise is not isotropic: its variance
along the i-th of a random set of orthogonal directions falls as 1/i**`--decay` (default 1: about 28 effective
dimensions of 512, 18 of 128), since learned embeddings spread over a few dozen directions, while isotropic noise
makes a cluster's points nearly equidistant, a harder and less realistic case (`--decay 0` gives it). Queries
are drawn from the same mixture but are not rows of the database.

Measured for every configuration: recall@k (the fraction of the exact top-k found; the exact top-k comes from
numpy), queries/s over the whole batch of queries (the best of `--repeats` timed rounds; the order of the
configurations flips every round so that load from other processes hits all alike), the speed-up over the
numpy brute force (`Q @ X.T` in chunks of queries, `np.argpartition`, sort), build time and size. Peers: numpy,
FAISS IndexFlatIP (exact; its vectors are the ones numpy reads and every refine step re-ranks with: one copy),
three IVFs sharing one k-means of `--nlist` lists (nprobe sweep): IndexIVFFlat (exact distances in the probed
lists), IndexIVFScalarQuantizer (8 bits a dimension) and IndexIVFPQ, each of the last two by its codes' distances
alone and re-ranked by IndexRefine (k_factor x k candidates); with `--hnsw` (or `--quick`) IndexHNSWFlat
(efSearch sweep), left out by default: 64 s to build at 100k x 512 on 2 cores, so some 12 minutes at 1M (an
estimate, not measured). FAISS and numpy's BLAS get `--threads` threads (numpy's OpenBLAS keeps its own pool,
limited through threadpoolctl when it is installed); np.argpartition itself runs on one thread. The last lines
name, per family, the fastest configuration reaching recall@k >= `--target`, whether it is `--goal` times faster
than numpy, and the peak RSS and total time. The numbers are printed only: a speed is never a test assertion.

    .venv/bin/python bench/search.py            # 1M x 512, 1000 queries, k=10: 8.5 minutes, 10 GB on 2 cores
    .venv/bin/python bench/search.py --quick    # 100k x 512 with HNSW: 2-4 minutes, 2 GB
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from collections.abc import Callable

import numpy as np

try:
    import faiss
except ImportError:
    raise SystemExit("bench/search.py needs FAISS: pip install faiss-cpu") from None

CHUNK = 256  # queries scored at a time by the numpy brute force: a 256 x n float32 block


def make_data(n: int, queries: int, dim: int, centres: int, spread: float, decay: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` database rows and `queries` query rows from one clustered mixture, every row of unit norm."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((centres, dim)).astype(np.float32)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, centres)
    scale = spread * rng.uniform(0.5, 1.5, centres).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)  # orthogonal directions
    variance = 1.0 / np.arange(1, dim + 1) ** decay
    std = np.sqrt(variance / variance.sum()).astype(np.float32)  # E|noise|^2 = 1 before the cluster's scale
    total = n + queries
    out = np.empty((total, dim), np.float32)
    for start in range(0, total, 65536):
        rows = min(65536, total - start)
        cluster = rng.choice(centres, rows, p=weights / weights.sum())
        noise = (rng.standard_normal((rows, dim), dtype=np.float32) * std) @ basis
        block = mu[cluster] + scale[cluster, None] * noise
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    rng.shuffle(out)  # in place (no second copy); queries: the last rows of the same draw, left out of the database
    return out[:n], out[n:].copy()


def numpy_top_k(X: np.ndarray, Q: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Exact top-k by inner product, best first: scores for `chunk` queries at a time, argpartition, sort."""
    out = np.empty((len(Q), k), np.int64)
    for start in range(0, len(Q), chunk):
        scores = Q[start:start + chunk] @ X.T
        np.negative(scores, out=scores)  # in place (no second block): the best first for argpartition
        top = np.argpartition(scores, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true top-k ids found, over all queries (-1, FAISS's missing result, never matches)."""
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).sum() / truth.size)


def index_mb(index) -> float:
    """What an index holds, counted from its parts (serialising it would copy gigabytes): vectors or codes, ids,
    an IVF's centroids, an HNSW graph's links."""
    if isinstance(index, faiss.IndexIVF):
        size = index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4
    else:
        size = index.ntotal * index.d * 4
        if isinstance(index, faiss.IndexHNSW):
            size += index.hnsw.neighbors.size() * 4 + index.ntotal * 8
    return size / 2**20


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    begun = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k x 512, fewer sweep points, with HNSW")
    parser.add_argument("--n", type=int, default=0, help="database vectors; 0: 1,000,000 (--quick: 100,000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--centres", type=int, default=1000, help="clusters in the mixture")
    parser.add_argument("--spread", type=float, default=0.8, help="noise norm about a centre")
    parser.add_argument("--decay", type=float, default=1.0, help="noise variance on axis i ~ 1/i**decay")
    parser.add_argument("--threads", type=int, default=0, help="FAISS and BLAS threads; 0: FAISS's default")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    parser.add_argument("--hnsw", action="store_true", help="add HNSW (on with --quick; slow to build at 1M)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=100)
    parser.add_argument("--ef-search", type=ints, default=[16, 32, 64], help="comma-separated sweep")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: 2*sqrt(n) up to a power of two")
    parser.add_argument("--pq-m", type=int, default=32, help="PQ sub-quantizers of 8 bits (must divide dim)")
    parser.add_argument("--train", type=int, default=0, help="IVF training sample; 0: 50 per list")
    parser.add_argument("--nprobe", type=ints, default=[], help="comma-separated; default 2,4,8,16 (--quick 4,8,16)")
    parser.add_argument("--k-factor", type=ints, default=[2, 10], help="re-ranked candidates per result")
    parser.add_argument("--target", type=float, default=0.95, help="recall@k a configuration must reach")
    parser.add_argument("--goal", type=float, default=10.0, help="speed-up over numpy the project aims for")
    args = parser.parse_args()
    args.n = args.n or (100_000 if args.quick else 1_000_000)
    args.nprobe = args.nprobe or ([4, 8, 16] if args.quick else [2, 4, 8, 16])

    threads = args.threads or faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    blas = "numpy's BLAS uses its own thread pool (install threadpoolctl to limit it)"
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        # Limits every BLAS and OpenMP pool in the process: numpy's OpenBLAS and FAISS's own OpenBLAS/libgomp.
        threadpool_limits(limits=threads)
        pools = [f"{p['internal_api']} {p.get('version') or '?'} ({p['num_threads']} threads, "
                 f"{p['filepath'].split('/')[-1]})" for p in threadpool_info()]
        blas = "thread pools: " + "; ".join(pools)
    except ImportError:
        pass
    nlist = args.nlist or 2 ** math.ceil(math.log2(2 * math.sqrt(args.n)))
    k = args.k

    start = time.perf_counter()
    X, Q = make_data(args.n, args.queries, args.dim, args.centres, args.spread, args.decay, args.seed)
    print(f"faiss {faiss.__version__}, numpy {np.__version__}, threads={threads}; {blas}")
    print(f"data: {args.n:,} x {args.dim} database, {args.queries:,} queries, k={k}, {args.centres} centres, "
          f"spread {args.spread}, decay {args.decay}, seed {args.seed} ({time.perf_counter() - start:.1f}s)")

    # (family, config, build seconds, index MB, search returning ids)
    runs: list[tuple[str, str, float, float, Callable[[], np.ndarray]]] = []

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)  # exact peer, and the vectors every refine step re-ranks with
    flat.add(X)
    X = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * args.dim).reshape(flat.ntotal, args.dim)  # one copy
    flat_build = time.perf_counter() - start
    runs.append(("numpy", "exact", 0.0, index_mb(flat), lambda: numpy_top_k(X, Q, k)))
    runs.append(("faiss-flat", "exact", flat_build, index_mb(flat), lambda: flat.search(Q, k)[1]))

    def searcher(index, search: Callable[[], np.ndarray], **settings) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            for name, value in settings.items():
                setattr(index, name, value)
            return search()

        return run

    if args.hnsw or args.quick:
        start = time.perf_counter()
        hnsw = faiss.IndexHNSWFlat(args.dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = args.ef_construction
        hnsw.add(X)
        hnsw_build = time.perf_counter() - start
        print(f"hnsw: M={args.hnsw_m}, efConstruction={args.ef_construction}: built in {hnsw_build:.1f}s "
              f"(peak RSS {peak_gb():.1f} GB)")
        for ef in args.ef_search:
            runs.append(("hnsw", f"M={args.hnsw_m} efSearch={ef}", hnsw_build, index_mb(hnsw),
                         searcher(hnsw.hnsw, lambda: hnsw.search(Q, k)[1], efSearch=ef)))

    # Three IVFs on one k-means (trained once, by the first; its time counts in each one's build): exact
    # distances in the probed lists (IVF-Flat); 8-bit scalar or product codes whose candidates the exact
    # vectors of `flat` re-rank (IndexRefine, k_factor x k of them; k_factor 0: the codes' own ranking).
    train = min(args.n, args.train or 50 * nlist)
    sample = X[np.sort(np.random.default_rng(args.seed + 1).choice(args.n, train, replace=False))]
    quantizer = faiss.IndexFlatIP(args.dim)
    families = [("ivf-flat", faiss.IndexIVFFlat(quantizer, args.dim, nlist, faiss.METRIC_INNER_PRODUCT)),
                ("ivf-sq8", faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(args.dim), args.dim, nlist,
                                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)),
                ("ivfpq", faiss.IndexIVFPQ(faiss.IndexFlatIP(args.dim), args.dim, nlist, args.pq_m, 8,
                                           faiss.METRIC_INNER_PRODUCT))]
    kmeans = 0.0
    for family, ivf in families:
        start = time.perf_counter()
        if family != "ivf-flat":  # the k-means centroids of the first, so train() learns only the codes
            ivf.quantizer.add(faiss.rev_swig_ptr(quantizer.get_xb(), nlist * args.dim).reshape(nlist, args.dim))
        ivf.train(sample)
        trained = time.perf_counter() - start
        kmeans = kmeans or trained
        ivf.add(X)
        build = time.perf_counter() - start + (kmeans if family != "ivf-flat" else 0.0)
        print(f"{family}: nlist={nlist}, {ivf.code_size} bytes a vector, trained on {train:,} in {trained:.1f}s, "
              f"built in {build:.1f}s with the k-means (peak RSS {peak_gb():.1f} GB)")
        if family == "ivf-flat":
            for nprobe in args.nprobe:
                runs.append((family, f"nprobe={nprobe}", build, index_mb(ivf),
                             searcher(ivf, lambda ivf=ivf: ivf.search(Q, k)[1], nprobe=nprobe)))
            continue
        refine = faiss.IndexRefine(ivf, flat)
        for k_factor in [0, *args.k_factor]:
            for nprobe in args.nprobe:
                if k_factor:
                    config = f"nprobe={nprobe} refine k_factor={k_factor}"
                    run = searcher(refine, searcher(ivf, lambda r=refine: r.search(Q, k)[1], nprobe=nprobe),
                                   k_factor=k_factor)
                else:
                    config = f"nprobe={nprobe} (code distances)"
                    run = searcher(ivf, lambda ivf=ivf: ivf.search(Q, k)[1], nprobe=nprobe)
                runs.append((family, config, build, index_mb(ivf) + (index_mb(flat) if k_factor else 0), run))

    truth = runs[0][4]()  # untimed first calls: the numpy peer's ids are the ground truth for every recall
    recalls = [1.0] + [recall(run(), truth) for *_, run in runs[1:]]
    best = [math.inf] * len(runs)
    for r in range(args.repeats):
        for i in range(len(runs)) if r % 2 == 0 else reversed(range(len(runs))):
            start = time.perf_counter()
            runs[i][4]()
            best[i] = min(best[i], time.perf_counter() - start)
    scores = math.inf  # how much of the numpy peer's time is the BLAS product alone
    for _ in range(args.repeats):
        start = time.perf_counter()
        for first in range(0, len(Q), CHUNK):
            _ = Q[first:first + CHUNK] @ X.T
        scores = min(scores, time.perf_counter() - start)

    rows = [{"family": family, "config": config, "build_s": round(build, 2), "size_mb": round(size, 1),
             f"recall@{k}": round(rec, 4), "qps": round(args.queries / t, 1),
             "speedup": round(best[0] / t, 2)}
            for (family, config, build, size, _), rec, t in zip(runs, recalls, best)]
    print(f"\n{'family':11} {'config':34} {'build s':>8} {'MB':>7} {f'recall@{k}':>9} {'queries/s':>10} "
          f"{'x numpy':>8}")
    for row in rows:
        print(f"{row['family']:11} {row['config']:34} {row['build_s']:>8.1f} {row['size_mb']:>7.1f} "
              f"{row[f'recall@{k}']:>9.4f} {row['qps']:>10,.0f} {row['speedup']:>8.2f}")
    print(f"numpy brute force: the scores (BLAS, threads={threads}) take {scores * 1e3:.0f} of its "
          f"{best[0] * 1e3:.0f} ms; the rest is np.argpartition and sort, on one thread")
    total = time.perf_counter() - begun
    print(json.dumps({"bench": "search", "n": args.n, "dim": args.dim, "queries": args.queries, "k": k,
                      "centres": args.centres, "spread": args.spread, "decay": args.decay, "seed": args.seed,
                      "threads": threads, "nlist": nlist, "numpy_scores_s": round(scores, 4),
                      "peak_rss_gb": round(peak_gb(), 2), "total_s": round(total), "rows": rows}))
    for family in dict.fromkeys(row["family"] for row in rows[2:]):
        ok = [row for row in rows if row["family"] == family and row[f"recall@{k}"] >= args.target]
        if not ok:
            top = max((row for row in rows if row["family"] == family), key=lambda row: row[f"recall@{k}"])
            print(f"{family}: no configuration reaches recall@{k} >= {args.target} "
                  f"(best {top[f'recall@{k}']:.4f}: {top['config']}); goal (>= {args.goal:g}x numpy) not met")
            continue
        row = max(ok, key=lambda row: row["qps"])
        verdict = "met" if row["speedup"] >= args.goal else "not met"
        print(f"{family}: fastest reaching recall@{k} >= {args.target}: {row['config']} "
              f"(recall {row[f'recall@{k}']:.4f}, {row['qps']:,.0f} queries/s, {row['speedup']:.1f}x numpy, "
              f"built in {row['build_s']:.0f}s); goal (>= {args.goal:g}x numpy) {verdict}")
    print(f"peak RSS {peak_gb():.1f} GB; total {total:.0f}s")


if __name__ == "__main__":
    main()
