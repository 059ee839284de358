"""Networks: the backbones (ResNets, RegNets, `keras.applications` wrappers; `backbones`),
Vision Transformers (`vit`, teachers converted from DINO/DINOv2/timm/HF and DeiT-style
students) with the sources' positional-embedding resizes (`pos_embed`), prediction and
projection heads (`heads`), SwAV's prototypes and queue layers (`clustering`) and the fused
BatchNorm they share (`fused_batch_norm`). Keras layers and models only; it may import
`choices`, nothing else of kd_keras.
"""
