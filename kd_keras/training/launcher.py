"""Starts the workers of a multi-worker run on this host and restarts the ones that die.

  python -m kd_keras.launch --num_workers=2 -- --flagfile=flags/simreg.cfg --workdir=/tmp/run

Every flag after `--` goes unchanged to each worker's `python -m kd_keras.train ...
--strategy=multi_worker` (the launcher's flag last, so that it wins over any flagfile); worker
k gets a TF_CONFIG naming all workers on --host (free ports unless --ports is given) with
itself as task k. Worker output is printed with a
"[worker k]" prefix.

When a worker dies (killed, crashed: any exit other than 0 or 2), it is started again with the
same TF_CONFIG, up to --max_restarts times in all; the surviving workers restart themselves
(kd_keras.distributed) and everyone resumes from the newest common checkpoint. A worker that
ends with exit code 2 (bad input) stops the whole launch. The exit code is 0 when every worker
finished, else the first failing worker's code.

Several hosts: start `python -m kd_keras.train --strategy=multi_worker` yourself on each host
with its TF_CONFIG (see README, "Multi-worker training").
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from kd_keras import choices

USAGE_ERROR = 2
PREEMPTED = choices.PREEMPTED_EXIT_CODE


def free_ports(host, count):
    """`count` distinct ports that are free on `host` right now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def tf_config(addresses, index):
    """The TF_CONFIG JSON of worker `index` in a cluster of `addresses` (a "worker" job)."""
    return json.dumps(
        {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}
    )


# What the launcher sets on every worker. absl applies flags in order, a flagfile's contents
# where the flagfile is named: these come last so that no preset (flags/common.cfg sets
# --strategy=auto) can turn the workers back into single-process runs.
LAUNCHER_FLAGS = ("--strategy=multi_worker",)


def worker_command(train_args):
    return [sys.executable, "-m", "kd_keras.train", *train_args, *LAUNCHER_FLAGS]


def _pump(stream, prefix):
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()
    stream.close()


class Launch:
    """The worker processes of one launch.

    Args:
      train_args: flags for kd_keras.train.
      addresses: "host:port" per worker.
      max_restarts: restarts of dead workers allowed in all.
      env: base environment of the workers (default: this process').
    """

    def __init__(self, train_args, addresses, max_restarts, env=None):
        self.train_args = list(train_args)
        self.addresses = list(addresses)
        self.max_restarts = max_restarts
        self.restarts = 0
        self.env = dict(os.environ if env is None else env)
        self.procs = [None] * len(addresses)

    def start(self, index):
        env = dict(self.env, TF_CONFIG=tf_config(self.addresses, index))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.Popen(
            worker_command(self.train_args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.procs[index] = proc
        print(f"[launch] worker {index} pid {proc.pid} at {self.addresses[index]}", flush=True)
        threading.Thread(
            target=_pump, args=(proc.stdout, f"[worker {index}] "), daemon=True
        ).start()

    def stop_all(self):
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                # TensorFlow may sit in a collective that ignores SIGTERM: kill after a grace.
                proc.terminate()
        deadline = time.time() + 10
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def run(self, poll_seconds=0.5):
        """Starts every worker and supervises them; returns the launch's exit code."""
        for index in range(len(self.addresses)):
            self.start(index)
        finished, preempted = set(), set()
        self._forward_signals()
        try:
            while len(finished) < len(self.procs):
                time.sleep(poll_seconds)
                for index, proc in enumerate(self.procs):
                    code = proc.poll()
                    if code is None or index in finished:
                        continue
                    if code in (0, PREEMPTED):
                        # PREEMPTED: the workers agreed on a step, saved it and stopped.
                        finished.add(index)
                        if code == PREEMPTED:
                            preempted.add(index)
                        continue
                    if code == USAGE_ERROR or self.restarts >= self.max_restarts:
                        print(f"[launch] worker {index} exited with {code}; stopping.", flush=True)
                        self.stop_all()
                        return code if code > 0 else 1
                    self.restarts += 1
                    print(
                        f"[launch] worker {index} exited with {code}; restarting it "
                        f"({self.restarts}/{self.max_restarts}).",
                        flush=True,
                    )
                    self.start(index)
        except KeyboardInterrupt:
            self.stop_all()
            return 128 + signal.SIGINT
        if preempted:
            print(f"[launch] workers {sorted(preempted)} saved and stopped on a signal; run the "
                  "same command again to resume.", flush=True)
            return PREEMPTED
        return 0

    def _forward_signals(self):
        """SIGTERM/SIGINT to the launcher go to every worker, which save the same step and exit
        with PREEMPTED (kd_keras.preemption); the launcher then exits with that code too."""

        def forward(signum, frame):
            print(f"[launch] {signal.Signals(signum).name}: asking the workers to save and stop",
                  flush=True)
            for proc in self.procs:
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, forward)
            except ValueError:  # not the main thread (tests driving Launch directly)
                pass
