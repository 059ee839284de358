"""Networks: the backbones (ResNets, RegNets, `keras.applications` wrappers; `backbones`),
prediction and projection heads (`heads`), SwAV's prototypes and queue layers (`clustering`)
and the fused BatchNorm they share (`fused_batch_norm`). Keras layers and models only; it may
import `choices`, nothing else of kd_keras.
"""
