"""Runs issue 22's hostile inputs against a kd_keras tree and prints outcome and peak memory.

  python scripts/hostile_memory.py --tree=/work/wt-22          # after
  git worktree add /tmp/before22 1761431
  python scripts/hostile_memory.py --tree=/tmp/before22        # before

The files come from tests/hostile.py of *this* checkout (numpy, pickle and zipfile only; no
torch). Each case runs in a child process with PYTHONPATH=--tree; its peak RSS is the child's
RUSAGE_CHILDREN maxrss as seen by a wrapper (tests/hostile.py:peak_rss). A case that has not
finished after --timeout seconds is reported as a hang.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from tests import hostile  # noqa: E402

SWAV = os.path.join(HERE, "tests", "data", "convert", "swav.pth.tar")
SWAV_ARCH = "resnet-bottleneck-1.2.1.1-2"

READ = """
import numpy as np
from kd_keras.teachers import checkpoint_io
try:
    source = checkpoint_io.read_checkpoint({path!r})
    arrays = {{k: np.asarray(v) for c in source.containers.values() for k, v in c.items()}}
    x = arrays.get("x")
    print("read; x =", None if x is None else x.ravel()[:4].tolist())
except ValueError as err:
    print("error:", str(err)[:160])
"""

LOAD = """
from kd_keras.teachers import torch_pickle
try:
    print("read", sorted(torch_pickle.load({path!r})))
except ValueError as err:
    print("error:", str(err)[:160])
"""

CONVERT = """
import sys
from kd_keras import convert
sys.argv = ["kd_keras.convert", *{args!r}]
convert.run_cli()
"""

FOLDER = """
from kd_keras.data import sources
examples, info = sources.load_split({source!r}, "train", verify={verify})
print("examples", sum(1 for _ in examples), "skipped", info.skipped_files)
"""


def _weights(**tensors):
    w = hostile.tensor(np.ones((2, 2), np.float32), "w")
    return {"state_dict": {"fc.weight": w, **tensors}}


def _cases(tmp):
    one = hostile.Storage("p", np.ones(1, np.float32))
    cases = {}
    bomb = hostile.Storage("s", np.zeros(4, np.float32), numel=4, raw=200 << 20)
    cases["zip bomb: 200 MB member, 4 elements declared"] = READ.format(
        path=hostile.write_zip(f"{tmp}/bomb.pth", _weights(x=hostile.Tensor(bomb, (2, 2))), True)
    )
    honest = hostile.Storage("s", np.zeros(4, np.float32), numel=50 << 20, raw=200 << 20)
    cases["200 MB storage, tensor uses 4 elements"] = READ.format(
        path=hostile.write_zip(
            f"{tmp}/honest.pth", _weights(x=hostile.Tensor(honest, (2, 2))), True
        )
    )
    small = hostile.Storage("s", np.arange(4, dtype=np.float32))
    for name, write in (("zip", hostile.write_zip), ("legacy", hostile.write_legacy)):
        cases[f"storage_offset=-1 ({name})"] = READ.format(
            path=write(f"{tmp}/neg.{name}", _weights(x=hostile.Tensor(small, (2, 2), None, -1)))
        )
    loop = []
    loop.append(loop)
    # Inside a dict entry, which the reader describes (counts its tensors).
    cases["self-containing list"] = READ.format(
        path=hostile.write_zip(f"{tmp}/loop.pth", {**_weights(), "extra": {"loop": loop}})
    )
    cases["self-containing list, torch_pickle.load"] = LOAD.format(
        path=hostile.write_zip(f"{tmp}/loop2.pth", {**_weights(), "extra": {"loop": loop}})
    )
    shared = [1]
    for _ in range(80):
        shared = [shared, shared]
    cases["list shared 80 levels deep"] = READ.format(
        path=hostile.write_zip(f"{tmp}/shared.pth", {**_weights(), "extra": {"s": shared}})
    )
    from kd_keras.teachers import torch_pickle

    sd = torch_pickle.load(SWAV)["state_dict"]
    tensors = {k: hostile.tensor(v, str(i)) for i, (k, v) in enumerate(sd.items())}
    tensors["module.prototypes.weight"] = hostile.Tensor(one, (1 << 24, 8), (0, 0))
    swav = hostile.write_zip(f"{tmp}/swav.pth", {"state_dict": tensors})
    cases["SwAV prototypes [2^24, 8], stride 0 (convert CLI)"] = CONVERT.format(
        args=[f"--checkpoint={swav}", f"--arch={SWAV_ARCH}", f"--out={tmp}/swav_out"]
    )
    home = f"{tmp}/home"
    os.makedirs(home)
    open(f"{home}/thesis.tex", "w").write("years of work")
    fixture = os.path.join(HERE, "tests", "data", "convert", "torchvision_basic_zip.pth")
    kept = f"{home}/thesis.tex"
    cases["convert --overwrite onto a non-teacher dir (CLI)"] = (
        f"import atexit, os; atexit.register(lambda: print('thesis.tex kept:', "
        f"os.path.exists({kept!r})))\n"
        + CONVERT.format(
            args=[f"--checkpoint={fixture}", "--arch=resnet-basic-2.1.1.1-3", f"--out={home}",
                  "--overwrite"]  # fmt: skip
        )
    )
    from PIL import Image

    for name in ("a", "b"):
        os.makedirs(f"{tmp}/folder/train/{name}")
        for i in range(4):
            Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(f"{tmp}/folder/train/{name}/{i}.png")
    hostile.write_png(f"{tmp}/folder/train/a/bomb.png", 10_000, 10_000)
    for verify in (True, False):
        cases[f"100 Mpx PNG (97 KB) in a folder, verify={verify}"] = FOLDER.format(
            source=f"folder:{tmp}/folder", verify=verify
        )
    return cases


def _outcome(output):
    """The lines that say what happened (results, errors, the last line of a traceback)."""
    starts = ("read", "error", "examples", "kd_keras", "thesis")
    lines = [ln for ln in output.splitlines() if ln.startswith(starts) or "Error:" in ln]
    return lines[-2:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", required=True, help="kd_keras checkout to run against")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": os.path.abspath(args.tree),
               "TF_CPP_MIN_LOG_LEVEL": "3", "KD_KERAS_CACHE_DIR": f"{tmp}/cache"}  # fmt: skip
        print(f"tree {args.tree}; load {os.getloadavg()[0]:.2f}")
        print("| case | exit | outcome (first line) | peak RSS MB |")
        print("|---|---|---|---|")
        for name, code in _cases(tmp).items():
            out = hostile.peak_rss(code, env, timeout=args.timeout)
            if out.get("timed_out"):
                text = f"still running after {args.timeout:.0f} s (killed)"
            else:
                text = " / ".join(_outcome(out["stdout"] + out["stderr"]))[:220] or "(no output)"
            print(f"| {name} | {out['returncode']} | {text} | {out['peak_mb']:.0f} |", flush=True)
    print(json.dumps({"load_after": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
