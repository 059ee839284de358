"""Multi-worker training: TF_CONFIG checks, a bounded wait for the cluster, roles, recovery.

`--strategy=multi_worker` runs one process per worker, each with the same command and its own
`TF_CONFIG`, e.g. for worker 1 of 2:

  {"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 1}}

A "chief" job of one task may replace worker 0. The chief (worker 0 when there is no chief
job) writes logs, results and the export; every worker keeps its own checkpoints, so a worker
can resume on a host that shares no file system with the others.

Failure handling:
* a malformed TF_CONFIG is a ValueError naming what is wrong;
* a cluster that does not form within `timeout_seconds` (a worker never started, a wrong
  address) is a TimeoutError naming the unreachable workers (one line, exit code 2);
* when a peer dies during training the others' collectives fail (TensorFlow aborts them);
  `restart_after_peer_failure` then re-executes the surviving process with its own command,
  so that every worker resumes from the same checkpoint once the dead one is started again.
"""

import dataclasses
import json
import os
import shutil
import socket
import sys
import tempfile
import time

JOBS = ("chief", "worker")
RESTARTS_ENV = "KD_KERAS_PEER_RESTARTS"

_strategy = None
_info = None


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process' place in the cluster.

    Attributes:
      task_type: "chief" or "worker".
      task_index: index within its job.
      addresses: "host:port" of every worker, chief first: position = worker id.
      worker_id: this process' position in `addresses` (0 = chief).
    """

    task_type: str
    task_index: int
    addresses: tuple
    worker_id: int

    @property
    def num_workers(self):
        return len(self.addresses)

    @property
    def is_chief(self):
        return self.worker_id == 0

    def name(self, worker_id):
        return f"worker {worker_id} ({self.addresses[worker_id]})"


def _check_address(job, i, address):
    if not isinstance(address, str) or address.count(":") < 1:
        raise ValueError(f'TF_CONFIG: cluster["{job}"][{i}] must be "host:port", got {address!r}.')
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f'TF_CONFIG: cluster["{job}"][{i}] = {address!r} needs a host and a port in 1-65535.'
        )


def parse_tf_config(raw):
    """Validates a TF_CONFIG string and returns this process' `ClusterInfo`.

    Raises:
      ValueError: naming TF_CONFIG and what is wrong (missing, not JSON, unsupported jobs such
        as "ps", a bad address, a duplicate address, a task outside the cluster).
    """
    if raw is None or not raw.strip():
        raise ValueError(
            "--strategy=multi_worker needs the TF_CONFIG environment variable (see README, "
            "'Multi-worker training'), or start the workers with python -m kd_keras.launch."
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}.") from err
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError('TF_CONFIG must be a JSON object with a "cluster" object.')
    cluster = config["cluster"]
    unsupported = sorted(set(cluster) - set(JOBS))
    if unsupported:
        raise ValueError(
            f"TF_CONFIG: jobs {unsupported} are not supported; MultiWorkerMirroredStrategy "
            f"uses {list(JOBS)}."
        )
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f'TF_CONFIG: cluster["{job}"] must be a non-empty list of host:port.')
        for i, address in enumerate(addresses):
            _check_address(job, i, address)
    if len(cluster.get("chief", [])) > 1:
        raise ValueError('TF_CONFIG: the "chief" job has one task at most.')
    ordered = tuple(cluster.get("chief", [])) + tuple(cluster.get("worker", []))
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"TF_CONFIG: an address appears twice in the cluster: {list(ordered)}.")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError('TF_CONFIG needs "task": {"type": "worker", "index": N}.')
    task_type, index = task["type"], task["index"]
    if task_type not in cluster:
        raise ValueError(
            f"TF_CONFIG: task type {task_type!r} is not a job of the cluster {sorted(cluster)}."
        )
    if not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ValueError(
            f'TF_CONFIG: task index {index!r} is outside cluster["{task_type}"] '
            f"({len(cluster[task_type])} tasks)."
        )
    offset = len(cluster.get("chief", [])) if task_type == "worker" else 0
    return ClusterInfo(task_type, index, ordered, offset + index)


def unreachable(info, timeout=1.0):
    """Worker ids (other than this one) whose address does not accept a TCP connection."""
    out = []
    for worker_id, address in enumerate(info.addresses):
        if worker_id == info.worker_id:
            continue
        host, _, port = address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError:
            out.append(worker_id)
    return out


def wait_for_peers(info, timeout_seconds, poll_seconds=0.2):
    """Returns once every other worker's address accepts TCP connections.

    TensorFlow's own wait for the cluster holds the Python interpreter lock and ignores
    signals, so a missing worker would hang it for good; this check runs first, in Python.
    Meanwhile this process listens on its own address, so that peers doing the same check see
    it (the listener is closed before TensorFlow's server takes the port).

    Raises:
      TimeoutError: naming the workers that did not answer within `timeout_seconds`.
      ValueError: this worker's own port is taken by another program.
    """
    port = int(info.addresses[info.worker_id].rpartition(":")[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
        listener.listen(16)
    except OSError as err:
        listener.close()
        raise ValueError(
            f"TF_CONFIG: {info.name(info.worker_id)} cannot listen on port {port}: {err}."
        ) from err
    deadline = time.monotonic() + timeout_seconds
    try:
        while True:
            missing = unreachable(info, timeout=min(1.0, timeout_seconds))
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{info.name(info.worker_id)}: the TF_CONFIG cluster of {info.num_workers} "
                    f"workers did not form within --multi_worker_timeout={timeout_seconds:g} s: "
                    "no answer from " + ", ".join(info.name(i) for i in missing) + "."
                )
            time.sleep(poll_seconds)
    finally:
        listener.close()


def cluster_info():
    """`ClusterInfo` of the multi-worker strategy made by `multi_worker_strategy` (or None)."""
    return _info


def multi_worker_strategy(timeout_seconds):
    """The process' MultiWorkerMirroredStrategy, made once, after every worker is up.

    Waits at most `timeout_seconds` for the other workers (`wait_for_peers`), then builds the
    strategy and passes a first collective, which every worker reaches.

    Raises:
      ValueError: a malformed TF_CONFIG.
      TimeoutError: a worker did not start in time.
    """
    global _strategy, _info
    if _strategy is not None:
        return _strategy
    import tensorflow as tf

    info = parse_tf_config(os.environ.get("TF_CONFIG"))
    wait_for_peers(info, timeout_seconds)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.AUTO
        )
    )
    gather_ints(strategy, info.worker_id)  # a barrier: every worker has started
    _strategy, _info = strategy, info
    return strategy


def gather_ints(strategy, value):
    """The int `value` of every replica, in replica order (a collective: all must call it)."""
    import tensorflow as tf

    @tf.function
    def _gather():
        ctx = tf.distribute.get_replica_context()
        return ctx.all_gather(tf.constant([value], tf.int64), axis=0)

    result = strategy.experimental_local_results(strategy.run(_gather))[0]
    return [int(v) for v in result.numpy()]


def barrier(strategy):
    """Returns once every worker has reached it."""
    gather_ints(strategy, 0)


def is_peer_failure(err):
    """Whether `err` is how TensorFlow reports a lost or restarted peer in a collective.

    A collective that fails for another reason (mismatched collectives: a bug) is not one,
    so that it ends the run instead of restarting it forever.
    """
    import tensorflow as tf

    if isinstance(err, tf.errors.UnavailableError):
        return True
    kinds = (
        tf.errors.AbortedError,
        tf.errors.CancelledError,
        tf.errors.DeadlineExceededError,
        tf.errors.FailedPreconditionError,
        tf.errors.InternalError,
    )
    text = str(err).lower()
    return isinstance(err, kinds) and any(hint in text for hint in _PEER_FAILURE_HINTS)


_PEER_FAILURE_HINTS = (
    "unavailable",
    "failed to connect",
    "connection reset",
    "connection refused",
    "socket closed",
    "heartbeat",
    "incarnation",
    "restarted",
    "is down",
)


def restart_after_peer_failure(err, max_restarts):
    """Re-executes this worker's command after a peer failure, at most `max_restarts` times.

    The new process waits (bounded by --cluster_timeout) for the failed worker to be started
    again, and every worker then resumes from the newest checkpoint they all have. Returns
    only when the restart budget is spent.
    """
    done = int(os.environ.get(RESTARTS_ENV, "0"))
    if done >= max_restarts:
        return
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(
        f"kd_keras.train: a peer worker failed ({first_line[:200]}); restarting this worker "
        f"from its last checkpoint ({done + 1}/{max_restarts}).",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    time.sleep(1.0)  # let the dead worker's address be released before the cluster re-forms
    env = dict(os.environ, **{RESTARTS_ENV: str(done + 1)})
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Where this process writes.

    Attributes:
      is_chief: writes config, logs, results, export (True outside multi-worker runs).
      checkpoint_dirs: its own checkpoint directory first, then the chief's (a worker may
        resume from the chief's copy when both are on a shared file system).
      logdir: TensorBoard directory; a scratch directory on non-chief workers (Keras'
        convention: only the chief's summaries are kept), removed by `finish`.
    """

    is_chief: bool
    checkpoint_dirs: tuple
    logdir: str
    scratch: str | None = None

    def finish(self, strategy):
        """Waits for every worker (multi-worker runs), then removes the scratch directory."""
        if self.scratch is not None:
            barrier(strategy)
            shutil.rmtree(self.scratch, ignore_errors=True)
        elif _info is not None and strategy is _strategy:
            barrier(strategy)


def worker_role(workdir, multi_worker, checkpoint_name, log_name):
    """The `WorkerRole` of this process in a run under `workdir`.

    The chief uses `workdir/<checkpoint_name>` and `workdir/<log_name>`; worker k > 0 keeps its
    checkpoints in `workdir/worker_k/<checkpoint_name>` (on its own host's disk when the
    workdir is not shared) and its logs in a temporary directory.
    """
    chief_checkpoints = os.path.join(workdir, checkpoint_name)
    info = _info if multi_worker else None
    if info is None or info.is_chief:
        return WorkerRole(True, (chief_checkpoints,), os.path.join(workdir, log_name))
    own = os.path.join(workdir, f"worker_{info.worker_id}", checkpoint_name)
    scratch = tempfile.mkdtemp(prefix=f"kd_keras_worker{info.worker_id}_")
    return WorkerRole(False, (own, chief_checkpoints), os.path.join(scratch, log_name), scratch)


def resume_step(strategy, checkpoint_dirs):
    """The optimizer step this process resumes from (0 for a new run).

    Alone, the newest checkpoint. In a multi-worker run every worker must resume from the same
    step: the newest one all of them hold. A worker that died while saving may be one save
    behind the others, which still hold that previous checkpoint (two are kept).
    """
    from kd_keras.artifacts import checkpointing

    available = set()
    for directory in checkpoint_dirs:
        available.update(checkpointing.available_steps(directory))
    newest = max(available, default=0)
    if _info is None or strategy is not _strategy:
        return newest
    agreed = min(gather_ints(strategy, newest))
    if agreed and agreed not in available:
        raise FileNotFoundError(
            f"{_info.name(_info.worker_id)} has no checkpoint of step {agreed}, the newest "
            f"one every worker holds (it has {sorted(available)} in {list(checkpoint_dirs)})."
        )
    if agreed < newest:
        print(
            f"kd_keras.train: {_info.name(_info.worker_id)} resumes from step {agreed}, the "
            f"newest checkpoint of every worker (its own newest is {newest}).",
            file=sys.stderr,
            flush=True,
        )
    return agreed
