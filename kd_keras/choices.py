"""The names a flag chooses from, in one TensorFlow-free place.

`kd_keras.config` offers them as flag choices; the modules that implement them (augment,
heads, knn, optimizers, schedules) check their arguments against the same tuples, so a new
choice is added here once.
"""

AUGMENTATIONS = ("weak", "strong", "none")  # augment.make_view_fn kinds (SimReg B.2)
AUG_MODES = ("same", "different")  # one image for teacher and student, or two
# augment.resize_crop: "auto" interpolates upsampled crops with plain bilinear (the same values
# as the antialiased kernel up to float rounding, several times faster) and antialiases the
# downsampled ones; "antialias" uses TF's antialiased kernel for every crop (the bits of
# kd_keras before --view_resize, e.g. for an older teacher cache).
VIEW_RESIZES = ("auto", "antialias")
# --augment=strong's blur: the SimReg paper's (sigma in [0, 1], always) or its code's
# (MoCo-v2: sigma in [0.1, 2], p = 0.5); augment.STRONG_BLURS holds the numbers.
STRONG_BLURS = ("paper", "official")
# heads.prediction_head kinds; the *_official ones are UCDvision/simreg's own variants.
HEADS = ("linear", "mlp2", "mlp4", "linear_official", "mlp2_official")
# nets.initializers.dense: torch.nn.Linear's default init (the papers' PyTorch code) or Keras'
# glorot-uniform kernels with zero biases.
HEAD_INITS = ("torch", "keras")
KNN_VOTES = ("majority", "weighted")  # knn voting rules (SimReg; DINO's weighted vote)
OPTIMIZERS = ("sgd", "lars")  # optimizers.make_optimizer
SCHEDULES = ("cosine", "constant", "epoch_cosine", "step")  # optimizers.learning_rate_schedule
# optimizers.SGD: torch.optim.SGD's buffer (buf = m buf + g; w -= lr buf) or Keras' velocity
# (v = m v - lr g; w += v); they differ whenever the learning rate changes.
MOMENTUM_FORMS = ("torch", "keras")
# How CompRess' loss reads bank rows (--compress_bank_rows): unit = l2-normalised again,
# as_stored = as CompRess' SampleSimilarities does.
COMPRESS_BANK_ROWS = ("unit", "as_stored")

# Exit code of a run stopped by SIGTERM/SIGINT after saving its checkpoint (EX_TEMPFAIL: run
# the same command again to resume). kd_keras.launch passes it on.
PREEMPTED_EXIT_CODE = 75
