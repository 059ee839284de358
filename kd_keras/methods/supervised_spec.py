"""Registration of supervised training (recipe teachers, baselines; no TensorFlow here)."""

from kd_keras.methods import registry

registry.register(
    registry.MethodSpec(
        name="supervised",
        summary="Cross-entropy on labels through a linear classifier (trains recipe teachers).",
        builder="kd_keras.methods.supervised:build_supervised",
        views="single",
        needs_labels=True,
        knn_random_init=False,
    )
)
