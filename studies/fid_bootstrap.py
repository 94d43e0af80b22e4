"""FID and its bootstrap std from a finished cell's per-chunk feature cache, without generating anything again.

    python -m studies.fid_bootstrap --ref DIR/refs/inception-test.npz DIR/cache/inception/lcm-seed0/nfe-*

For cells measured at one sampling seed (the studies' Inception columns): the std of FID over resamplings of the
N samples (atdiff.eval.fid.ReferenceFID.bootstrap_std, the same estimate ``toolkit eval compare`` reports) says how far
another draw of N seeds could move the number. Prints one JSON line per cache directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def cached_features(directory: Path):
    """Every chunk-*.npz of a feature cache (eval/features.py), in order, as one [N, D] array."""
    import numpy as np

    from atdiff.runtime.errors import ToolkitError
    chunks = sorted(directory.glob("chunk-*.npz"))
    if not chunks:
        raise ToolkitError(f"{directory} has no chunk-*.npz feature files; point at a finished cell's cache")
    arrays = []
    for path in chunks:
        with np.load(path, allow_pickle=False) as data:
            if len(data.files) != 1:
                raise ToolkitError(f"{path} holds {data.files}, expected one feature array")
            arrays.append(data[data.files[0]])
    return np.concatenate(arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("caches", type=Path, nargs="+", help="Feature cache directories of finished cells.")
    parser.add_argument("--ref", type=Path, required=True, help="Reference statistics (.npz, same features).")
    parser.add_argument("--rounds", type=int, default=20, help="Bootstrap resamplings.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the resampling.")
    args = parser.parse_args(argv)
    from atdiff.eval.fid import ReferenceFID, load_stats
    reference = ReferenceFID(load_stats(args.ref))
    for directory in args.caches:
        feats = cached_features(directory)
        print(json.dumps({"cache": str(directory), "num": len(feats), "fid": reference(feats),
                          "fid_std": reference.bootstrap_std(feats, rounds=args.rounds, seed=args.seed),
                          "rounds": args.rounds, "seed": args.seed}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
