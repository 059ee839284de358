"""Distillation losses as pure functions of tensors.

All losses return the mean over the local (per-replica) batch. Under a multi-replica
`tf.distribute` strategy the caller divides by `num_replicas_in_sync` before taking gradients,
because Keras 3's optimizer sums the replicas' gradients (see `methods/base.py`).

Argument order: the STUDENT side comes first, then the teacher side (`simreg_loss(prediction,
target)`, `compress_loss(student, teacher, ...)`, `seed_loss(student, teacher, ...)`), the
reverse of Keras' `loss(y_true, y_pred)`. Gradients flow only through the student argument:
the teacher argument is a constant. To use these losses with Keras' own API, use the adapters
in `kd_keras.distillation` (e.g. `SimRegLoss` for `keras.distillation.Distiller`), which take
Keras' order.
"""

import numbers

import numpy as np
import tensorflow as tf


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """Scales `x` to unit l2 norm along `axis` (float32 arithmetic).

    Args:
      x: float tensor [..., D].
    Returns:
      float32 tensor of the same shape.
    """
    x = tf.cast(x, tf.float32)
    return tf.math.l2_normalize(x, axis=axis, epsilon=epsilon)


def simreg_distances(prediction, target):
    """Per-example SimReg distance: squared Euclidean distance of l2-normalised vectors.

    For unit vectors ||p - t||^2 = 2 - 2 cos(p, t), so each value lies in [0, 4].

    Args:
      prediction: student prediction-head output, float [B, D].
      target: teacher features, float [B, D] (treated as a constant).
    Returns:
      float32 [B].
    """
    _check_same_shape(prediction, target)
    p = l2_normalize(prediction)
    t = tf.stop_gradient(l2_normalize(target))
    return tf.reduce_sum(tf.square(p - t), axis=-1)


def simreg_loss(prediction, target):
    """SimReg loss: the batch mean of `simreg_distances` (= mean of 2 - 2 cos).

    Args:
      prediction: student prediction-head output, float [B, D].
      target: teacher features, float [B, D] (treated as a constant).
    Returns:
      float32 scalar.
    """
    return tf.reduce_mean(simreg_distances(prediction, target))


def regress_distances(prediction, target):
    """Per-example 'Regress' distance: squared Euclidean distance of unnormalised features.

    Args:
      prediction: float [B, D]; target: float [B, D] (treated as a constant).
    Returns:
      float32 [B]: sum over D of (prediction - target)^2.
    """
    _check_same_shape(prediction, target)
    p = tf.cast(prediction, tf.float32)
    t = tf.stop_gradient(tf.cast(target, tf.float32))
    return tf.reduce_sum(tf.square(p - t), axis=-1)


def regress_loss(prediction, target):
    """'Regress' baseline loss: the batch mean of `regress_distances`.

    Args:
      prediction: float [B, D]; target: float [B, D] (treated as a constant).
    Returns:
      float32 scalar.
    """
    return tf.reduce_mean(regress_distances(prediction, target))


def cosine_similarity(a, b):
    """Per-example cosine similarity, float32 [B] for inputs [B, D]."""
    return tf.reduce_sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def mean_squared_error(a, b):
    """Per-example mean over D of the squared difference, float32 [B] for inputs [B, D]."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    return tf.reduce_mean(tf.square(a - b), axis=-1)


def _check_same_shape(prediction, target):
    p_dim = prediction.shape[-1]
    t_dim = target.shape[-1]
    if p_dim is not None and t_dim is not None and p_dim != t_dim:
        raise ValueError(
            f"prediction has feature dimension {p_dim} but the teacher target has {t_dim}; "
            "the prediction head's output size must equal the teacher's feature dimension."
        )


def sinkhorn(scores, epsilon=0.05, num_iters=3, row_mask=None):
    """SwAV's Sinkhorn-Knopp codes (equal-partition soft assignments) for a batch of scores.

    Follows SwAV's `distributed_sinkhorn`: with Q = exp(scores / epsilon)^T ([K, N]), normalise
    the total mass to 1, then `num_iters` times make every prototype's mass over the samples
    1/K and every sample's mass over the prototypes 1/N, and finally multiply by N so that each
    sample's code sums to 1. After the last iteration each code row sums to exactly 1, while the
    per-prototype sums over the batch are only approximately N/K (the last step is a sample
    normalisation, which disturbs the prototype marginal again).

    The iteration runs in the log domain. Every normalisation divides by a sum, so the global
    total (and SwAV's subtraction of the global max before `exp`) only rescales Q by a constant
    that the next normalisation removes; working with logarithms and `logsumexp` gives the same
    codes without forming exp(scores / epsilon), so no row or column can underflow to zero,
    even with epsilon = 0.01 and scores far outside [-1, 1] (SwAV's exp-domain version returns
    NaN there).

    Distribution: called in a replica context of a strategy with `num_replicas_in_sync` > 1
    (e.g. inside `strategy.run` or a Keras `train_step` under MirroredStrategy /
    MultiWorkerMirroredStrategy), each replica passes its own rows and the per-prototype sums
    run over the GLOBAL batch: each replica's per-prototype log-sums are exchanged with one
    `ReplicaContext.all_reduce(SUM)` of a [replicas, K] tensor (one row per replica) and
    combined with a logsumexp, i.e. the cross-replica sum of the masses done without
    underflow (TF's all-reduce offers only SUM/MEAN, no MAX for a shared shift). The
    per-sample normalisation is local. A replica's output therefore equals its rows of a
    single-device call on the replicas' inputs concatenated in replica order. Because the
    constant factors N and 1/K cancel in the log domain, local batches may even differ in
    size (SwAV assumes equal ones). In a cross-replica context or without a strategy the
    input is treated as the whole batch.

    Args:
      scores: float [N, K] similarities between l2-normalised embeddings and prototypes (the
        rows may include queued embeddings); any float dtype, computed in float32.
      epsilon: entropic regularisation (> 0); SwAV/OSS use 0.05.
      num_iters: Sinkhorn iterations (>= 1); SwAV/OSS use 3.
      row_mask: optional bool [N]; rows where it is False take no part (as if they were
        absent) and get all-zero codes. This lets a queue enter the problem from a given step
        on without changing tensor shapes (no control flow around the all-reduce, XLA-ready).
        At least one row per replica must be valid.
    Returns:
      float32 [N, K] codes, valid rows summing to 1, wrapped in `tf.stop_gradient`.
    """
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or epsilon <= 0:
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}.")
    if not isinstance(num_iters, numbers.Integral) or isinstance(num_iters, bool) or num_iters < 1:
        raise ValueError(f"num_iters must be an integer >= 1, got {num_iters!r}.")
    scores = tf.convert_to_tensor(scores)
    if not scores.dtype.is_floating:
        raise ValueError(f"scores must be a float tensor, got dtype {scores.dtype.name}.")
    if scores.shape.rank is not None and scores.shape.rank != 2:
        raise ValueError(f"scores must have shape [N, K], got shape {scores.shape}.")

    # The codes are targets: no gradient may flow back into the scores.
    log_q = tf.stop_gradient(tf.cast(scores, tf.float32)) / float(epsilon)
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1

    def prototype_log_mass(x):
        # [1, K]: log of each prototype's mass summed over the global batch.
        local = tf.reduce_logsumexp(x, axis=0, keepdims=True)
        if replicas == 1:
            return local
        # Gather the replicas' log-masses into [replicas, K] with a SUM all-reduce: each
        # replica fills only its own row, so the sum adds exact zeros. Summing the masses
        # themselves could underflow; the logsumexp over the gathered rows cannot.
        row = tf.one_hot(context.replica_id_in_sync_group, replicas, dtype=tf.float32)
        gathered = context.all_reduce(tf.distribute.ReduceOp.SUM, row[:, None] * local)
        return tf.reduce_logsumexp(gathered, axis=0, keepdims=True)

    if row_mask is None:

        def mask(x):
            return x

    else:
        valid = tf.reshape(tf.cast(row_mask, tf.bool), [-1, 1])

        def mask(x):
            # log(0) = -inf: no mass, so the row drops out of every prototype sum. The
            # per-sample step turns such rows into NaN (-inf minus -inf); re-masking after it
            # resets them before they can reach the next prototype sum.
            return tf.where(valid, x, tf.constant(-np.inf, tf.float32))

    log_q = mask(log_q)
    for _ in range(int(num_iters)):
        # Prototype masses equal (SwAV's "/ sum_of_rows / K"; the constant 1/K cancels).
        log_q = log_q - prototype_log_mass(log_q)
        # Sample masses equal (SwAV's "/ sum over prototypes / N"; the constant cancels).
        log_q = mask(log_q - tf.reduce_logsumexp(log_q, axis=1, keepdims=True))
    # Rows are now log-normalised: exp gives codes that sum to 1 (SwAV's final "* N").
    return tf.stop_gradient(tf.exp(log_q))


def swapped_prediction_loss(codes, scores, temperature=0.1, denominator=None):
    """SwAV's swapped prediction: predict each assignment crop's code from the other views.

    With views v = 0..V-1 (scores[v] = embeddings of view v against the prototypes) and a code
    q_i for some of them (SwAV and OSS: the two large crops, i = 0, 1):

      loss = (1 / len(codes)) * sum_i [ sum_{v != i} CE(q_i, softmax(scores[v] / T)) ] / denom

    where CE(q, p) = -mean_over_batch(sum_k q_k log p_k). Only the view the code came from is
    left out. SwAV uses denom = V - 1 (the number of terms); OSS (appendix A.1) concatenates
    the plain and dropout views (V = 2(2 + n_small)) and divides by 2(2 + n_small) - 2 although
    2(2 + n_small) - 1 views enter the sum (the dropout twin of crop i is predicted too): pass
    `denominator` to reproduce that exactly.

    Args:
      codes: dict {view index i: float [B, K] code of view i} (targets, no gradient).
      scores: float [V, B, K] or a list of V tensors [B, K]: embedding . prototypes.
      temperature: softmax temperature T (> 0); SwAV/OSS use 0.1.
      denominator: divisor of each code's sum; default V - 1.
    Returns:
      float32 scalar.
    """
    if not codes:
        raise ValueError("swapped_prediction_loss needs at least one code.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if isinstance(scores, (list, tuple)):
        scores = tf.stack(scores)
    scores = tf.cast(scores, tf.float32)
    num_views = scores.shape[0]
    if num_views is None or num_views < 2:
        raise ValueError(f"scores must hold >= 2 views along axis 0, got shape {scores.shape}.")
    denominator = float(num_views - 1 if denominator is None else denominator)
    # [V, B, K] log-probabilities, computed once and shared by every code.
    log_p = tf.nn.log_softmax(scores / temperature, axis=-1)
    total = 0.0
    for i, q in codes.items():
        if not 0 <= i < num_views:
            raise ValueError(f"code index {i} is not a view index in [0, {num_views}).")
        q = tf.stop_gradient(tf.cast(q, tf.float32))
        # [V, B]: cross-entropy of every view against q_i, then drop view i itself.
        ce = -tf.reduce_sum(q[None] * log_p, axis=-1)
        keep = tf.constant([v != i for v in range(num_views)], tf.float32)
        total += tf.reduce_sum(tf.reduce_mean(ce, axis=1) * keep) / denominator
    return total / len(codes)


def domain_classification_loss(logits, label):
    """Cross-entropy of the OSS feature classifier: every row of `logits` has class `label`.

    Args:
      logits: float [N, 2] classifier outputs (0 = teacher, 1 = student).
      label: int, the true class of all rows.
    Returns:
      (loss float32 scalar: mean cross-entropy, accuracy float32 scalar).
    """
    logits = tf.cast(logits, tf.float32)
    labels = tf.fill(tf.shape(logits)[:1], int(label))
    loss = tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    )
    accuracy = tf.reduce_mean(
        tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32)
    )
    return loss, accuracy


# --- Similarity-distribution and contrastive baselines (CompRess, SEED, CRD) -----------------
#
# These losses compare a batch with a memory of other samples' features (a bank or queue, see
# `kd_keras.memory_bank`). Every feature and every memory row is l2-normalised here, and the
# memory is a constant: no gradient reaches it. The caller scores the batch against the memory
# BEFORE pushing the batch into it, as the original codes do.


def _check_rank(name, x, rank):
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {x.shape}.")


def _positive(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def memory_logits(features, memory, temperature, normalise_memory=True):
    """Cosine similarities of a batch to every memory row, divided by a temperature.

    Args:
      features: float [B, D] (l2-normalised here).
      memory: float [K, D] bank rows (a constant; l2-normalised here unless
        `normalise_memory` is False).
      temperature: T > 0.
      normalise_memory: False reads the rows as stored (CompRess: its random initial rows
        are not unit vectors, so the logits are features_b . memory_k / T for them).
    Returns:
      float32 [B, K]: cos(features_b, memory_k) / T (or the plain dot products / T).
    """
    features = tf.convert_to_tensor(features)
    memory = tf.convert_to_tensor(memory)
    _check_rank("features", features, 2)
    _check_rank("memory", memory, 2)
    if (
        features.shape[-1] is not None
        and memory.shape[-1] is not None
        and features.shape[-1] != memory.shape[-1]
    ):
        raise ValueError(
            f"features have dimension {features.shape[-1]} but the memory rows have "
            f"{memory.shape[-1]}; the head's output size must equal the bank's row size."
        )
    rows = l2_normalize(memory) if normalise_memory else tf.cast(memory, tf.float32)
    rows = tf.stop_gradient(rows)
    return tf.matmul(l2_normalize(features), rows, transpose_b=True) / temperature


def compress_loss(
    student, teacher, student_bank, teacher_bank, temperature=0.04, normalise_banks=True
):
    """CompRess loss (Koohpayegani et al., NeurIPS 2020, Eq. 1-3): KL(p_teacher || p_student).

    With unit vectors s_b (student), t_b (teacher), anchors a^s_k (student bank) and a^t_k
    (teacher bank), k = 1..K:

      p^t_b(k) = softmax_k(t_b . a^t_k / T),   p^s_b(k) = softmax_k(s_b . a^s_k / T)
      loss = (1 / B) sum_b sum_k p^t_b(k) (log p^t_b(k) - log p^s_b(k))

    i.e. PyTorch's `kl_div(log_softmax(student), softmax(teacher), reduction="batchmean")`
    as in CompRess' `nn/compress_loss.py` (class KLD).

    The two variants differ only in the anchors the student is scored against:
      * CompRess-2q: `student_bank` holds past student features [K, D_s] (the original fills
        it from a momentum copy of the student), `teacher_bank` past teacher features
        [K, D_t]; the dimensions may differ.
      * CompRess-1q: pass the teacher bank twice, ``compress_loss(s, t, bank, bank, T)``;
        the student must then be projected to the teacher's dimension (D_s = D_t).

    Args:
      student: float [B, D_s] student features (gradients flow through them).
      teacher: float [B, D_t] teacher features (a constant).
      student_bank: float [K, D_s] anchors for the student.
      teacher_bank: float [K, D_t] anchors for the teacher; same K as `student_bank`.
      temperature: T > 0 (CompRess: 0.04, `--compress_t` in its train_student.py).
      normalise_banks: True l2-normalises every bank row read (a^s_k, a^t_k unit vectors);
        False reads them as stored, as CompRess does (its initial random rows are not unit
        vectors; rows pushed later are).
    Returns:
      float32 scalar: mean over the batch of KL(p^t_b || p^s_b).
    """
    temperature = _positive("temperature", temperature)
    k_s, k_t = student_bank.shape[0], teacher_bank.shape[0]
    if k_s is not None and k_t is not None and k_s != k_t:
        raise ValueError(f"student_bank has {k_s} rows but teacher_bank has {k_t}.")
    student_logits = memory_logits(student, student_bank, temperature, normalise_banks)
    log_p_student = tf.nn.log_softmax(student_logits, axis=-1)
    teacher_logits = memory_logits(
        tf.stop_gradient(teacher), teacher_bank, temperature, normalise_banks
    )
    log_p_teacher = tf.nn.log_softmax(teacher_logits, axis=-1)
    kl = tf.reduce_sum(tf.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return tf.reduce_mean(kl)


def seed_loss(student, teacher, teacher_queue, student_temperature=0.2, teacher_temperature=1e-4):
    """SEED loss (Fang et al., ICLR 2021, Eq. 4-6): soft cross-entropy over [own teacher; queue].

    With unit vectors s_b, t_b and a queue of K past teacher embeddings d_k, the anchors of
    sample b are (t_b, d_1, ..., d_K), so that

      z^S_b = [s_b . t_b, s_b . d_1, ..., s_b . d_K] / tau_S
      p^T_b = softmax([t_b . t_b, t_b . d_1, ..., t_b . d_K] / tau_T)
      loss = -(1 / B) sum_b sum_j p^T_b(j) log softmax(z^S_b)(j)

    as in SEED's `seed/builder.py` (forward) and `tools/utils.py` (soft_cross_entropy).

    Args:
      student: float [B, D] student embeddings (gradients flow through them).
      teacher: float [B, D] teacher embeddings (a constant).
      teacher_queue: float [K, D] queued teacher embeddings.
      student_temperature: tau_S > 0 (SEED `--temp`, default 0.2).
      teacher_temperature: tau_T > 0 (SEED `--distill-t`, default 1e-4).
    Returns:
      float32 scalar.
    """
    tau_s = _positive("student_temperature", student_temperature)
    tau_t = _positive("teacher_temperature", teacher_temperature)
    _check_same_shape(student, teacher)
    s = l2_normalize(student)
    t = tf.stop_gradient(l2_normalize(teacher))
    own_s = tf.reduce_sum(s * t, axis=-1, keepdims=True)
    own_t = tf.reduce_sum(t * t, axis=-1, keepdims=True)
    # memory_logits divides by its temperature; pass 1 and scale here so the own-pair column
    # gets the same scale as the queue columns.
    logits_s = tf.concat([own_s, memory_logits(s, teacher_queue, 1.0)], axis=-1) / tau_s
    logits_t = tf.concat([own_t, memory_logits(t, teacher_queue, 1.0)], axis=-1) / tau_t
    targets = tf.nn.softmax(logits_t, axis=-1)
    return -tf.reduce_mean(tf.reduce_sum(targets * tf.nn.log_softmax(logits_s, axis=-1), axis=-1))


def crd_contrast_probabilities(embeddings, memory_rows, temperature, normalizer):
    """CRD's unnormalised probabilities exp(v . m / T) / Z of an embedding and sampled rows.

    Args:
      embeddings: float [B, E] (l2-normalised here).
      memory_rows: float [B, K + 1, E] rows of the OTHER network's memory for each sample,
        the positive (the sample's own row) first, then K negatives (a constant).
      temperature: T > 0 (CRD `--nce_t`, 0.07).
      normalizer: Z > 0, scalar (CRD fixes it from the first batch, `crd/memory.py`).
    Returns:
      float32 [B, K + 1].
    """
    temperature = _positive("temperature", temperature)
    embeddings = tf.convert_to_tensor(embeddings)
    memory_rows = tf.convert_to_tensor(memory_rows)
    _check_rank("embeddings", embeddings, 2)
    _check_rank("memory_rows", memory_rows, 3)
    rows = tf.stop_gradient(l2_normalize(memory_rows))
    scores = tf.einsum("bke,be->bk", rows, l2_normalize(embeddings))
    return tf.exp(scores / temperature) / tf.cast(normalizer, tf.float32)


def crd_nce_loss(probabilities, num_data, epsilon=1e-7):
    """CRD's NCE objective for one anchor side (Tian et al., ICLR 2020, Eq. 18).

    With P_0 the positive pair's and P_1..P_K the negatives' probabilities and the uniform
    noise distribution P_n = 1 / N over the N training samples:

      loss = -(1 / B) sum_b [ log(P_0 / (P_0 + K P_n)) + sum_k log(K P_n / (P_k + K P_n)) ]

    as RepDistiller's `crd/criterion.py` (ContrastLoss) computes it, including its eps in the
    denominators.

    Args:
      probabilities: float [B, K + 1] from `crd_contrast_probabilities`, positive first.
      num_data: N, the number of training samples (size of the memory).
      epsilon: RepDistiller's eps = 1e-7.
    Returns:
      float32 scalar.
    """
    probabilities = tf.cast(probabilities, tf.float32)
    _check_rank("probabilities", probabilities, 2)
    num_negatives = probabilities.shape[-1] - 1
    if num_negatives < 1:
        raise ValueError("probabilities need a positive column and at least one negative.")
    noise = num_negatives / float(num_data)
    positive = probabilities[:, 0]
    negatives = probabilities[:, 1:]
    log_d1 = tf.math.log(positive / (positive + noise + epsilon))
    log_d0 = tf.math.log(noise / (negatives + noise + epsilon))
    return -tf.reduce_mean(log_d1 + tf.reduce_sum(log_d0, axis=-1))


def crd_loss(
    student,
    teacher,
    student_memory_rows,
    teacher_memory_rows,
    temperature,
    num_data,
    student_normalizer,
    teacher_normalizer,
):
    """CRD's contrastive loss without its supervised terms (RepDistiller `CRDLoss`).

    Two symmetric NCE terms: the teacher embedding is the anchor for positives/negatives drawn
    from the student memory, and the student embedding for those drawn from the teacher memory:

      loss = NCE(P(t_b, M^s[idx_b]) / Z_t) + NCE(P(s_b, M^t[idx_b]) / Z_s)

    where P(v, m_k) = exp(v . m_k / T), idx_b = (own index, K random indices) and NCE is
    `crd_nce_loss`. Both embeddings carry gradients (the teacher's goes to its trainable
    embedding layer, CRD's `embed_t`); the memory rows are constants.

    Args:
      student: float [B, E] student embedding (after CRD's linear Embed).
      teacher: float [B, E] teacher embedding (after the teacher-side Embed).
      student_memory_rows: float [B, K + 1, E] rows of the student memory, positive first.
      teacher_memory_rows: float [B, K + 1, E] rows of the teacher memory, same indices.
      temperature: T (CRD `--nce_t` = 0.07).
      num_data: N, the training-set size.
      student_normalizer: Z of the student-anchored term (CRD's Z_v1).
      teacher_normalizer: Z of the teacher-anchored term (CRD's Z_v2).
    Returns:
      float32 scalar.
    """
    p_student = crd_contrast_probabilities(
        student, teacher_memory_rows, temperature, student_normalizer
    )
    p_teacher = crd_contrast_probabilities(
        teacher, student_memory_rows, temperature, teacher_normalizer
    )
    return crd_nce_loss(p_student, num_data) + crd_nce_loss(p_teacher, num_data)
