"""Command line: cache teacher features over E augmentation epochs (SimReg supplement B.1).

  python -m kd_keras.cache_teacher --flagfile=flags/simreg.cfg \
      --teacher=/runs/teacher --cache_dir=/caches/digits --cache_epochs=10

It takes the training flags that define the views (--dataset, --train_split, --image_size,
--augment, --aug_mode, --crop_scale_min, --view_resize, --seed, --teacher) and writes one
cache per teacher to `<cache_dir>/<teacher name>/`. Train with the same flags plus
`--teacher_cache=<cache_dir>` (or one `--teacher_cache` per teacher directory): training epoch
e replays the views of cache epoch e mod E and reads their features; the teachers are not
run on training batches.

A `recipe:` teacher is resolved to the recipe run of `--workdir` (which must exist, i.e. run
training once first, or pass the run directory as --teacher with name=recipe_<recipe>).
"""

import dataclasses
import logging
import os

log = logging.getLogger("kd_keras")


def resolve_teacher_specs(specs, workdir, image_size):
    """Loads the teachers named by --teacher (recipe teachers from `workdir`)."""
    from kd_keras.artifacts import layout
    from kd_keras.teachers import loading as teachers_lib

    loaded = []
    for i, raw in enumerate(specs):
        spec = teachers_lib.parse_teacher_spec(raw, i)
        if spec.kind == "recipe":
            run_dir = teachers_lib.recipe_dir(workdir or "", spec.recipe)
            if not workdir or not os.path.isfile(os.path.join(run_dir, layout.DONE_MARKER)):
                raise ValueError(
                    f"--teacher={raw}: a recipe teacher must be trained first; give the --workdir "
                    "of a training run that trained it (it lives in <workdir>/teacher_"
                    f"{spec.recipe}), or pass that directory as --teacher with "
                    f"name={spec.name}."
                )
            spec = dataclasses.replace(spec, kind="run", path=run_dir)
        loaded.append(teachers_lib.load_teacher(spec, image_size, i, workdir))
    return loaded


def run(cache_cfg, workdir=None):
    """Writes the caches described by a `config.CacheConfig`; returns their directories.

    `workdir` (default: `cache_cfg.workdir`) is the run whose recipe teachers are cached.
    """
    from kd_keras.data import sources as data
    from kd_keras.data import teacher_cache

    workdir = workdir or cache_cfg.workdir
    teachers = resolve_teacher_specs(cache_cfg.teachers, workdir, cache_cfg.data.image_size)
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise ValueError(f"Teacher names must be unique, got {names}; set name=... in --teacher.")
    d = cache_cfg.data
    examples, info = data.load_split(
        d.dataset,
        d.train_split,
        data_dir=d.data_dir,
        image_size_hint=d.image_size,
        download=d.download,
        max_image_pixels=d.max_image_pixels,
    )
    dirs = [os.path.join(cache_cfg.cache_dir, name) for name in names]
    print(
        f"Caching {', '.join(names)} over {cache_cfg.epochs} epochs of {info.num_examples} "
        f"{d.dataset}/{d.train_split} views ({d.augment}, {d.image_size} px) in "
        f"{cache_cfg.cache_dir}",
        flush=True,
    )
    teacher_cache.write_caches(
        dirs,
        teachers,
        examples,
        info,
        d,
        seed=cache_cfg.seed,
        epochs=cache_cfg.epochs,
        batch_size=cache_cfg.batch_size,
        shard_size=cache_cfg.shard_size,
        log=lambda line: print(line, flush=True),
    )
    for path in dirs:
        print(f"wrote {path}")
    return dirs
