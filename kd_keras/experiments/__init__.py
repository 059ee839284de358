"""Experiments: spec files (`spec`), the runner that plans and runs the training and
evaluation commands of each variant (`runner`) and the report it writes (`report`). It calls
`python -m kd_keras.train` / `kd_keras.evaluate` as subprocesses and may import `config`,
`methods.registry` and `artifacts`.
"""
