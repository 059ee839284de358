"""What a run writes and how it is read back: atomic JSON and step-exact checkpoints
(`checkpointing`), the exported backbone (`export`) and the names of a run directory's files
(`layout`). It may import `choices` and `nets` (an export reloads the heads' layers), nothing
above; readers higher up (evaluation, experiments, teacher loading) take run-directory names
from `layout`, never from the training command.
"""
