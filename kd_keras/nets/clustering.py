"""Online clustering state of SwAV and OSS: the prototypes and the queue of past embeddings.

Both live inside the method (a keras.Model), so they are saved in its checkpoints and a
resumed run continues with the same prototypes and the same queue.
"""

import keras
import tensorflow as tf

from kd_keras.nets import initializers


def replica_info():
    """(replica id (int or scalar tensor), replica count) of the current replica context."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: treat the input as the whole batch
        return 0, 1
    return context.replica_id_in_sync_group, context.num_replicas_in_sync


def all_gather(x):
    """Concatenates every replica's `x` along axis 0, in replica order.

    Built from one SUM all-reduce of a [replicas, ...] tensor in which each replica fills only
    its own row, the same collective the Sinkhorn uses; the result is identical on every
    replica, so state assigned from it stays identical too. Local batches must have equal
    sizes (tf.distribute splits a global batch evenly).

    Args:
      x: float [b, ...] local rows.
    Returns:
      [replicas * b, ...]; `x` itself with one replica.
    """
    replica, replicas = replica_info()
    if replicas == 1:
        return x
    row = tf.one_hot(replica, replicas, dtype=x.dtype)
    stacked = tf.reshape(row, [replicas] + [1] * x.shape.rank) * x[None]
    summed = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, stacked)
    return tf.reshape(summed, [-1, *x.shape[1:]])


@keras.saving.register_keras_serializable(package="kd_keras")
class Prototypes(keras.layers.Layer):
    """K trainable prototype vectors C [E, K], one shared set (OSS: teacher and student).

    Every prototype (column) has unit l2 norm: at initialisation and after every optimizer
    update (a `UnitNorm(axis=0)` constraint, which Keras applies right after each gradient
    step, as OSS's "normalize prototypes" after `update`). Scores are computed in float32.

    Before the normalisation the vectors are drawn as torch's `nn.Linear(E, K, bias=False)`
    draws SwAV's (U(+-1/sqrt(E)), init="torch") or from N(0, 1) (init="keras", the isotropic
    draw kd_keras used before); both are then scaled to unit norm.

    Args:
      num_prototypes: K (3000 in SwAV/OSS).
      dim: E, the embedding size (128).
      init: "torch" or "keras" (see above).
    Call: l2-normalised embeddings [N, E] -> scores [N, K] float32 (cosine similarities).
    """

    def __init__(self, num_prototypes=3000, dim=128, init="torch", **kwargs):
        super().__init__(**kwargs)
        initializers.check_init(init)
        self.init = init
        if int(num_prototypes) < 2 or int(dim) < 1:
            raise ValueError(
                f"need >= 2 prototypes and dim >= 1 (--num_prototypes, --proj_dim), got "
                f"K={num_prototypes}, E={dim}."
            )
        self.num_prototypes = int(num_prototypes)
        self.dim = int(dim)

    def build(self, input_shape=None):
        self.kernel = self.add_weight(
            shape=(self.dim, self.num_prototypes),
            initializer=(
                initializers.TorchLinearUniform()
                if self.init == "torch"
                else keras.initializers.RandomNormal(stddev=1.0)
            ),
            constraint=keras.constraints.UnitNorm(axis=0),
            dtype="float32",
            autocast=False,
            name="prototypes",
        )
        self.kernel.assign(tf.math.l2_normalize(self.kernel, axis=0))
        self.built = True

    def call(self, embeddings):
        return tf.matmul(tf.cast(embeddings, tf.float32), self.kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_prototypes)

    def get_config(self):
        config = super().get_config()
        config.update(num_prototypes=self.num_prototypes, dim=self.dim, init=self.init)
        return config


@keras.saving.register_keras_serializable(package="kd_keras")
class EmbeddingQueue(keras.layers.Layer):
    """Embeddings of the last `length` samples per assignment crop (SwAV's queue, OSS A.1).

    One global queue [num_crops, length, dim], newest rows first, identical on every replica:
    each step the GLOBAL batch's embeddings (all-gathered in replica order) are pushed on top
    and the oldest rows fall off, exactly A.1's `queue[i, B:] = queue[i, :-B];
    queue[i, :B] = z_i` with B the global batch. In the Sinkhorn step each replica
    contributes its own 1/replicas share of the rows (`local_rows`), so the rows enter the
    cross-replica sums once and the codes equal a single device running the global batch
    (SwAV keeps a separate per-GPU queue of its local samples, which is the same set of rows;
    a global queue also survives a change of the replica count on resume).

    The state is saved with the method's weights: `queue` and `count` (rows filled so far).

    Args:
      num_crops: crops whose codes are computed (2: the two large crops).
      length: rows per crop L (3840 at batch 256 in OSS); must divide by the global batch.
      dim: embedding size E.
    """

    def __init__(self, num_crops=2, length=3840, dim=128, **kwargs):
        super().__init__(**kwargs)
        self.num_crops = int(num_crops)
        self.length = int(length)
        self.dim = int(dim)

    def build(self, input_shape=None):
        # only_first_replica: every replica assigns the same (all-gathered) value; the
        # strategy keeps the copies identical instead of refusing a replica-context update.
        self.queue = self.add_weight(
            shape=(self.num_crops, self.length, self.dim),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
            aggregation="only_first_replica",
            name="queue",
        )
        self.count = self.add_weight(
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="int32",
            aggregation="only_first_replica",
            name="count",
        )
        self.built = True

    def check_batch(self, global_batch):
        """Raises a ValueError unless the queue length is a multiple of `global_batch`."""
        if self.length % global_batch:
            raise ValueError(
                f"--queue_length={self.length} must be a multiple of the global batch "
                f"--batch_size={global_batch} (OSS: 3840 = 15 x 256)."
            )

    def local_rows(self, crop):
        """This replica's share of crop `crop`'s queue: rows [L / replicas, E] and validity
        mask bool [L / replicas] (rows not yet written are invalid)."""
        replica, replicas = replica_info()
        share = self.length // replicas
        rows = tf.reshape(tf.convert_to_tensor(self.queue)[crop], [replicas, share, self.dim])
        positions = tf.range(self.length, dtype=tf.int32)
        filled = tf.reshape(positions < tf.convert_to_tensor(self.count), [replicas, share])
        return tf.gather(rows, replica), tf.gather(filled, replica)

    def push(self, embeddings):
        """Pushes each crop's local embeddings [b, E] (list of `num_crops`) of this step.

        All replicas' rows are gathered first, so the update is the same everywhere.
        """
        if len(embeddings) != self.num_crops:
            raise ValueError(f"expected {self.num_crops} embedding sets, got {len(embeddings)}.")
        new = tf.stack([all_gather(tf.cast(e, tf.float32)) for e in embeddings])
        batch = new.shape[1]
        if batch is not None and self.length % batch:
            raise ValueError(
                f"--queue_length={self.length} must be a multiple of the global batch ({batch})."
            )
        old = tf.convert_to_tensor(self.queue)
        shifted = tf.concat([new, old[:, : self.length - tf.shape(new)[1]]], axis=1)
        self.queue.assign(shifted)
        self.count.assign(tf.minimum(self.count + tf.shape(new)[1], self.length))

    def get_config(self):
        config = super().get_config()
        config.update(num_crops=self.num_crops, length=self.length, dim=self.dim)
        return config
