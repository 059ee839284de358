"""Teachers: PyTorch checkpoint reading without executing pickles (`torch_pickle`,
`checkpoint_io`), the published checkpoints' key layouts (`layouts`; ViTs: `vit_layouts`),
exact conversion to kd_keras networks (`conversion`; ViTs: `vit_conversion`) and the
`--teacher` specs with their loading (`loading`). It may import `nets` and `artifacts`; a
method never reaches into a checkpoint.
"""
