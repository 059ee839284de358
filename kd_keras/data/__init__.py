"""Images in: data sources (TFDS, image folders, NumPy arrays; `sources`), the papers' views
and augmentations (`augment`) and on-disk teacher-feature caches (`teacher_cache`). It may
import `choices` and `artifacts`; it knows nothing of networks, teachers or methods.
"""
