"""The Python API for Keras programmers: distillers built from plain keras.Models.

It may import every layer below it (`methods`, `teachers`, `data`, `nets`, `losses`,
`config`, `optim`, `eval`, `training`), never the command lines. `kd_keras/__init__.py`
exposes its public names lazily; `registration` must stay import-free (it runs on
`import kd_keras`).
"""
