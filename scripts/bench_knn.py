"""Benchmark: FAISS `knn_classify` against a chunked NumPy brute-force k-NN classifier.

Both classifiers get the same random float32 features and labels and use the same majority vote
(`kd_keras.eval.knn.vote_neighbors`), so the timings compare the neighbour search: a FAISS flat
inner-product index versus NumPy matmul + argpartition. Each is timed `--repeats` times after a
small warm-up (thread pools, first-touch allocations) and the fastest run is reported.

Predictions are compared row by row. Float32 similarities from two BLAS libraries can differ in
the last bits, so two neighbours whose similarities are within ~1e-6 may swap places; every
disagreeing row is checked for such a near-tie (recomputed in float64) and the report says how
many disagreements this explains.

Example (repository root):
  python scripts/bench_knn.py --out /tmp/bench_knn.json
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

# Allow running as `python scripts/bench_knn.py` without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import faiss  # noqa: E402

from kd_keras.eval import knn  # noqa: E402

NEAR_TIE = 1e-5


def numpy_knn_classify(train, train_labels, test, k, num_classes, chunk_size):
    """Brute-force cosine k-NN with majority vote: exact, chunked over test rows.

    Args:
      train: float32 [N, D]; train_labels: int64 [N]; test: float32 [M, D].
    Returns:
      (predictions int64 [M], neighbour indices int64 [M, k] sorted nearest first).
    """
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    predictions = np.empty(len(test), np.int64)
    neighbours = np.empty((len(test), k), np.int64)
    for start in range(0, len(test), chunk_size):
        sims = test[start : start + chunk_size] @ train.T
        # argpartition finds the k largest in O(N); only those k are then sorted.
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -top_sims), axis=-1)
        top = np.take_along_axis(top, order, axis=1)
        top_sims = np.take_along_axis(top_sims, order, axis=1)
        chunk_predictions, _ = knn.vote_neighbors(
            train_labels[top], top_sims, num_classes, vote="majority"
        )
        predictions[start : start + chunk_size] = chunk_predictions
        neighbours[start : start + chunk_size] = top
    return predictions, neighbours


def timed(fn, repeats):
    """Runs `fn` `repeats` times; returns (last result, list of wall-clock seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, times


def near_tie_gap(train, test_rows, k):
    """Smallest gap between consecutive float64 similarities among each row's top k+1."""
    train = train.astype(np.float64)
    test_rows = test_rows.astype(np.float64)
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test_rows /= np.linalg.norm(test_rows, axis=1, keepdims=True)
    sims = -np.sort(-(test_rows @ train.T), axis=1)[:, : k + 1]
    return np.min(-np.diff(sims, axis=1), axis=1)


def machine_info():
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = models[0] if models else None
    except OSError:
        info["cpu_model"] = None
    try:
        import threadpoolctl

        info["thread_pools"] = [
            {key: pool.get(key) for key in ("internal_api", "version", "num_threads", "filepath")}
            for pool in threadpoolctl.threadpool_info()
        ]
    except ImportError:
        pass
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--num_train", type=int, default=50_000)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--faiss_chunk_size", type=int, default=4096)
    parser.add_argument(
        "--numpy_chunk_size",
        type=int,
        default=1024,
        help="test rows per matmul; the similarity block is chunk x num_train float32",
    )
    parser.add_argument("--num_threads", type=int, default=None, help="FAISS threads")
    parser.add_argument(
        "--faiss_database_block",
        type=int,
        default=None,
        help="faiss.cvar.distance_compute_blas_database_bs: database rows per BLAS block of the "
        "flat search (FAISS default 1024); larger blocks mean fewer, larger matrix products",
    )
    parser.add_argument(
        "--faiss_query_block",
        type=int,
        default=None,
        help="faiss.cvar.distance_compute_blas_query_bs (FAISS default 4096)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_knn.json", help="path of the JSON report")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    train = rng.standard_normal((args.num_train, args.dim), dtype=np.float32)
    test = rng.standard_normal((args.num_test, args.dim), dtype=np.float32)
    train_labels = rng.integers(0, args.num_classes, args.num_train)

    def run_faiss(test_rows=test):
        return knn.knn_classify(
            train,
            train_labels,
            test_rows,
            k=args.k,
            vote="majority",
            num_classes=args.num_classes,
            chunk_size=args.faiss_chunk_size,
            num_threads=args.num_threads,
        )

    def run_numpy(test_rows=test):
        return numpy_knn_classify(
            train, train_labels, test_rows, args.k, args.num_classes, args.numpy_chunk_size
        )

    faiss_defaults = {
        "database_block": faiss.cvar.distance_compute_blas_database_bs,
        "query_block": faiss.cvar.distance_compute_blas_query_bs,
    }
    if args.faiss_database_block:
        faiss.cvar.distance_compute_blas_database_bs = args.faiss_database_block
    if args.faiss_query_block:
        faiss.cvar.distance_compute_blas_query_bs = args.faiss_query_block
    # Warm-up on a few rows so thread-pool start-up is not billed to the first timed run.
    run_faiss(test[:64])
    run_numpy(test[:64])
    # The two alternate (NumPy, FAISS, NumPy, FAISS, ...) so that a change of machine load
    # during the benchmark hits both alike.
    faiss_times, numpy_times = [], []
    for _ in range(args.repeats):
        (numpy_pred, numpy_nbrs), t = timed(run_numpy, 1)
        numpy_times += t
        faiss_pred, t = timed(run_faiss, 1)
        faiss_times += t

    differ = np.flatnonzero(faiss_pred != numpy_pred)
    _, faiss_nbrs = knn.search_neighbors(train, test, args.k, chunk_size=args.faiss_chunk_size)
    explained = 0
    if differ.size:
        gaps = near_tie_gap(train, test[differ], args.k)
        explained = int(np.sum(gaps < NEAR_TIE))
    numpy_s, faiss_s = min(numpy_times), min(faiss_times)
    report = {
        "numpy_s": numpy_s,
        "faiss_s": faiss_s,
        "speedup": numpy_s / faiss_s,
        "numpy_times_s": numpy_times,
        "faiss_times_s": faiss_times,
        "shapes": {
            "num_train": args.num_train,
            "num_test": args.num_test,
            "dim": args.dim,
            "k": args.k,
            "num_classes": args.num_classes,
            "vote": "majority",
            "faiss_chunk_size": args.faiss_chunk_size,
            "numpy_chunk_size": args.numpy_chunk_size,
            "faiss_database_block": faiss.cvar.distance_compute_blas_database_bs,
            "faiss_query_block": faiss.cvar.distance_compute_blas_query_bs,
            "faiss_block_defaults": faiss_defaults,
        },
        "threads": {
            "faiss_omp_max_threads": args.num_threads or faiss.omp_get_max_threads(),
            "numpy_blas": "library default (see machine.thread_pools)",
        },
        "agreement": {
            "identical_predictions": bool(differ.size == 0),
            "prediction_agreement": 1.0 - differ.size / args.num_test,
            "num_disagreeing_rows": int(differ.size),
            "disagreements_explained_by_near_ties": explained,
            "near_tie_threshold": NEAR_TIE,
            "identical_neighbour_lists_fraction": float(
                np.mean(np.all(faiss_nbrs == numpy_nbrs, axis=1))
            ),
        },
        "repeats": args.repeats,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seed": args.seed,
        "machine": machine_info(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
