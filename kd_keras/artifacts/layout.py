"""Names of the files and folders kd_keras writes, in one place, and how to read them back.

A training run directory holds `config.json`, `checkpoints/`, `logs/`, `export/`,
`results.json` and `DONE` (written last); SwAV/OSS runs add `networks/<role>/` with a
`manifest.json` whose "kind" is `NETWORK_KIND`. Readers (evaluation, the experiment runner,
teacher loading) take these names from here instead of from the module that writes them, so
no reader depends on the training command.
"""

import json

RUN_CONFIG = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
EXPORT_DIR = "export"
RESULTS = "results.json"
DONE_MARKER = "DONE"

# SwAV/OSS networks (backbone + projection head + prototypes), written by a finished run or by
# `kd_keras.convert` from a published SwAV checkpoint.
NETWORKS_DIR = "networks"
NETWORK_MANIFEST = "manifest.json"
NETWORK_KIND = "kd_keras_clustering_network"


def read_json(path):
    """The parsed JSON file at `path`, or None when it is absent or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
