"""Memories of past features for CompRess, SEED and CRD: a FIFO bank and an indexed memory.

Both are Keras layers whose state is non-trainable variables (the rows and, for the FIFO
bank, the write pointer), so they are saved with the method's weights and a resumed run
continues with the same memory. Under MirroredStrategy / MultiWorkerMirroredStrategy every
write first all-gathers the replicas' rows in replica order (the order in which
tf.distribute splits a global batch), so every replica holds the same memory and 2 replicas
equal 1 device on the same global batch. The variables use ONLY_FIRST_REPLICA aggregation:
every replica writes the same gathered value, so the strategy keeps one copy's update.

Memory is fixed at construction (size x dim float32, plus the pointer): nothing grows during
training. The rows are stored as written; the losses in `kd_keras.losses` l2-normalise them
again when they read them.

Update order (the originals'): a step scores its batch against the memory, computes the
loss, then writes the batch. `FeatureBank.rows` read before `FeatureBank.push` in the same
`train_step` therefore see the memory without the current batch (automatic control
dependencies order the read before the write inside a tf.function).
"""

import math

import keras
import tensorflow as tf

from kd_keras.losses import l2_normalize
from kd_keras.nets.clustering import all_gather

INITS = ("uniform", "normal")

# A bank larger than this is almost certainly a typo in --bank_size / --queue_size.
MAX_BANK_BYTES = 16 * 2**30


def uniform_initializer(dim, seed=None):
    """CompRess' and CRD's initial rows: i.i.d. U(-a, a) with a = 1 / sqrt(dim / 3).

    CompRess `nn/compress_loss.py`, `SampleSimilarities.__init__` (``stdv = 1. /
    math.sqrt(feats_dim / 3)``; ``torch.rand(...).mul_(2 * stdv).add_(-stdv)``), the same as
    RepDistiller `crd/memory.py`, `ContrastMemory.__init__`. Each coordinate has variance
    a^2 / 3 = 1 / dim, so a row has squared norm 1 in expectation (std sqrt(0.8 / dim)); the
    rows are NOT normalised in the originals. The losses here normalise every row they read,
    which changes these initial rows by that ~sqrt(0.8 / dim) relative amount (2 % for
    dim = 2048) until they are overwritten.
    """
    bound = 1.0 / math.sqrt(dim / 3.0)
    return keras.initializers.RandomUniform(-bound, bound, seed=seed)


def _check_size(size, dim, flag):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{flag} must be a positive integer, got {size!r}.")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"the feature dimension of {flag}'s rows must be >= 1, got {dim!r}.")
    if size * dim * 4 > MAX_BANK_BYTES:
        raise ValueError(
            f"{flag}={size} rows of {dim} floats need {size * dim * 4 / 2**30:.1f} GiB "
            f"(> {MAX_BANK_BYTES / 2**30:.0f} GiB); use a smaller {flag}."
        )


@keras.saving.register_keras_serializable(package="kd_keras")
class FeatureBank(keras.layers.Layer):
    """FIFO bank (ring buffer) of the last `size` l2-normalised features of the global batch.

    `push` writes the gathered batch at rows pointer, pointer + 1, ... (mod size) and advances
    the pointer by the global batch, as CompRess' `SampleSimilarities.forward` (``index_copy_``
    at ``fmod(arange(B) + index, queueSize)``) and SEED's `_dequeue_and_enqueue` (``queue[:,
    ptr:ptr + B] = keys.T``) do; the oldest rows are overwritten first.

    Args:
      size: rows K (CompRess 128,000; SEED 65,536).
      dim: feature size D of a row.
      init: "uniform" (CompRess: `uniform_initializer`, rows not normalised) or "normal" (SEED
        `seed/builder.py`, `SEED.__init__`: ``torch.randn(dim, K)`` normalised along dim,
        i.e. K random unit vectors).
      flag: the flag that sets `size`, named in error messages.
      multiple_of_batch: require size to be a multiple of the global batch (SEED asserts
        ``K % batch_size == 0``; CompRess' modular index needs only size >= batch).
      seed: initializer seed (None: Keras' global seed generator).

    State (saved): `bank` float32 [K, D], `pointer` int32 [] (next row to write).
    """

    def __init__(
        self,
        size,
        dim,
        init="uniform",
        flag="--bank_size",
        multiple_of_batch=False,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_size(size, dim, flag)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}.")
        self.size = int(size)
        self.dim = int(dim)
        self.init = init
        self.flag = flag
        self.multiple_of_batch = bool(multiple_of_batch)
        self.seed = seed

    def build(self, input_shape=None):
        if self.init == "uniform":
            initializer = uniform_initializer(self.dim, self.seed)
        else:
            initializer = keras.initializers.RandomNormal(stddev=1.0, seed=self.seed)
        self.bank = self.add_weight(
            shape=(self.size, self.dim),
            initializer=initializer,
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="only_first_replica",
            name="bank",
        )
        if self.init == "normal":
            self.bank.assign(l2_normalize(self.bank))
        self.pointer = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="int32",
            aggregation="only_first_replica",
            name="pointer",
        )
        self.built = True

    def check_batch(self, global_batch):
        """Raises ValueError unless the bank can take `global_batch` rows per step."""
        if self.size < global_batch:
            raise ValueError(
                f"{self.flag}={self.size} is smaller than the global batch "
                f"--batch_size={global_batch}; the bank must hold at least one batch."
            )
        if self.multiple_of_batch and self.size % global_batch:
            raise ValueError(
                f"{self.flag}={self.size} must be a multiple of the global batch "
                f"--batch_size={global_batch} (as in SEED and MoCo: 65536 = 256 x 256)."
            )

    def rows(self):
        """The bank as it is now: float32 [K, D]."""
        return tf.convert_to_tensor(self.bank)

    def push(self, features):
        """Writes this step's features (the local rows [b, D] of each replica).

        The replicas' rows are all-gathered first (replica order = global batch order), so
        the bank and the pointer change identically on every replica.
        """
        features = tf.stop_gradient(l2_normalize(features))
        if features.shape[-1] != self.dim:
            raise ValueError(
                f"pushed features have dimension {features.shape[-1]}, the bank {self.dim}."
            )
        new = all_gather(features)
        count = new.shape[0]
        if count is not None:
            self.check_batch(count)
        count = tf.shape(new)[0]
        rows = (self.pointer + tf.range(count)) % self.size
        self.bank.value.scatter_update(tf.IndexedSlices(new, rows))
        self.pointer.assign((self.pointer + count) % self.size)

    def get_config(self):
        config = super().get_config()
        config.update(
            size=self.size,
            dim=self.dim,
            init=self.init,
            flag=self.flag,
            multiple_of_batch=self.multiple_of_batch,
            seed=self.seed,
        )
        return config


@keras.saving.register_keras_serializable(package="kd_keras")
class IndexedMemory(keras.layers.Layer):
    """One row per training sample, updated by a moving average (CRD's `ContrastMemory`).

    Row i belongs to the sample with dataset index i (the pipeline's "index"). `update`
    replaces rows idx by normalise(m * row + (1 - m) * feature), as RepDistiller's
    `crd/memory.py` does after scoring (momentum m = `--nce_m` = 0.5 there).

    Args:
      size: N, the number of training samples (the memory holds N x dim floats).
      dim: embedding size E (CRD `--feat_dim` = 128).
      flag: flag named in error messages.
      seed: initializer seed.

    State (saved): `memory` float32 [N, E], initialised with `uniform_initializer`.
    """

    def __init__(self, size, dim, flag="--crd_num_data", seed=None, **kwargs):
        super().__init__(**kwargs)
        _check_size(size, dim, flag)
        # Indices are gathered across replicas as float32, exact below 2^24.
        if size > 2**24:
            raise ValueError(f"{flag}={size}: at most 2^24 samples are supported.")
        self.size = int(size)
        self.dim = int(dim)
        self.flag = flag
        self.seed = seed

    def build(self, input_shape=None):
        self.memory = self.add_weight(
            shape=(self.size, self.dim),
            initializer=uniform_initializer(self.dim, self.seed),
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="only_first_replica",
            name="memory",
        )
        self.built = True

    def gather(self, indices):
        """Rows at `indices` (int [...]) -> float32 [..., E]."""
        return tf.gather(tf.convert_to_tensor(self.memory), tf.cast(indices, tf.int32))

    def update(self, indices, features, momentum):
        """Moving-average update of rows `indices` ([b] per replica) with features [b, E]."""
        features = tf.stop_gradient(l2_normalize(features))
        # Indices travel through the float all-gather (exact below 2^24, checked above).
        idx = tf.cast(all_gather(tf.cast(indices, tf.float32)), tf.int32)
        new = all_gather(features)
        old = tf.gather(tf.convert_to_tensor(self.memory), idx)
        mixed = l2_normalize(momentum * old + (1.0 - momentum) * new)
        self.memory.value.scatter_update(tf.IndexedSlices(mixed, idx))

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, dim=self.dim, flag=self.flag, seed=self.seed)
        return config
