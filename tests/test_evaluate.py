"""kd_keras.evaluate on a tiny distillation run (digits at 8 px, convnet_tiny) and the k-NN monitor."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kd_keras import config
from kd_keras.artifacts import export
from kd_keras.data import sources as data
from kd_keras.eval import evaluation as evaluate
from kd_keras.eval import features, knn, layers, subsets
from kd_keras.eval import monitor as callbacks
from kd_keras.nets import backbones
from kd_keras.training import run as train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch SimReg run with the k-NN monitor on every epoch: (run_dir, method)."""
    keras.utils.set_random_seed(11)
    root = tmp_path_factory.mktemp("eval")
    teacher = backbones.build_backbone("convnet_tiny", 8)
    teacher_path = str(root / "teacher.keras")
    teacher.save(teacher_path)
    cfg = config.Config(
        workdir=str(root / "run"),
        log_images=0,
        verbose=0,
        data=config.DataConfig(image_size=8, shuffle_buffer=256),
        model=config.ModelConfig(
            student="convnet_tiny", teachers=(f"{teacher_path},name=tt",), head="mlp2"
        ),
        optim=config.OptimConfig(batch_size=32, epochs=2, steps_per_epoch=3, lr=0.4),
        eval=config.EvalConfig(
            knn_k=(1, 5),
            eval_batch_size=128,
            knn_max_train=300,
            knn_monitor_every=1,
            knn_monitor_max_train=200,
            knn_monitor_max_test=100,
        ),
    )
    _, method = train.run_and_return_model(cfg)
    return cfg.workdir, method


def _eval_cfg(model, tmp_path, **overrides):
    base = config.EvaluateConfig(
        model=str(model),
        protocols=("knn",),
        knn_k=(1, 5),
        eval_batch_size=128,
        eval_dir=str(tmp_path / "eval"),
        projector_examples=0,
    )
    return dataclasses.replace(base, **overrides)


def test_knn_monitor_logs_every_epoch_to_tensorboard_and_json(run):
    run_dir, method = run
    acc = EventAccumulator(
        os.path.join(run_dir, "logs", "knn_monitor"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    assert {"knn_monitor/knn_top1_k1", "knn_monitor/knn_top1_k5"} <= set(acc.Tags()["tensors"])
    steps = [e.step for e in acc.Tensors("knn_monitor/knn_top1_k1")]
    assert steps == [1, 2]
    history = callbacks.read_knn_history(os.path.join(run_dir, callbacks.KNN_MONITOR_FILE))
    assert [e["epoch"] for e in history] == [1, 2]
    assert [e["step"] for e in history] == [3, 6]
    logged = float(tf.make_ndarray(acc.Tensors("knn_monitor/knn_top1_k1")[-1].tensor_proto))
    assert logged == pytest.approx(history[-1]["knn_top1_k1"])
    # The last entry is the k-NN accuracy of the final student on the same bounded subsets,
    # recomputed here with a brute-force NumPy 1-NN.
    ds_tr, ds_te = _monitor_sets(method.student, 200, 100)
    (xtr, ytr), (xte, yte) = ds_tr, ds_te
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argmax(unit(xte) @ unit(xtr).T, axis=1)
    assert history[-1]["knn_top1_k1"] == pytest.approx(np.mean(ytr[nearest] == yte))


def _monitor_sets(student, max_train, max_test):
    from kd_keras.data import augment

    out = []
    for split, cap in (("train", max_train), ("test", max_test)):
        examples, info = data.load_split("digits", split, image_size_hint=8)
        stride = -(-info.num_examples // cap)
        examples = examples.filter(lambda ex, s=stride: ex["index"] % s == 0)
        ds = data.make_eval_dataset(examples, lambda im: augment.center_crop(im, 8), 128)
        out.append(features.extract_features(student, ds))
    return out


def test_resumed_monitor_history_keeps_earlier_epochs(tmp_path):
    path = str(tmp_path / "knn_monitor.json")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    images = np.random.default_rng(0).uniform(size=(20, 8, 8, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": np.arange(20) % 2}).batch(8)
    monitor = callbacks.KNNMonitor(model, ds, ds, 2, (1,), str(tmp_path / "tb"), path)
    for epoch in range(4):  # measured after epochs 2 and 4
        monitor.on_epoch_end(epoch)
    again = callbacks.KNNMonitor(model, ds, ds, 2, (1,), str(tmp_path / "tb"), path)
    again.on_epoch_end(3)  # a resumed run re-measures epoch 4: replaced, not duplicated
    history = callbacks.read_knn_history(path)
    assert [e["epoch"] for e in history] == [2, 4]
    assert history[0]["knn_top1_k1"] == 1.0  # every query is in the memory


def test_exported_savedmodel_gives_the_knn_numbers_of_the_in_memory_model(run, tmp_path):
    run_dir, method = run
    cfg = _eval_cfg(run_dir, tmp_path, knn_votes=("majority", "weighted"))
    exported = evaluate.load_model(os.path.join(run_dir, "export"))
    assert exported.serve is not None  # the backbone layer is the SavedModel itself
    from_export = evaluate.evaluate(exported, cfg)
    in_memory = evaluate.evaluate(
        evaluate.LoadedModel.from_keras(method.student, run_dir=run_dir),
        dataclasses.replace(cfg, eval_dir=str(tmp_path / "eval2")),
    )
    assert from_export["knn"] == in_memory["knn"]
    assert set(from_export["knn"]) == {"majority", "weighted"}
    # Independent check of one number: majority 1-NN from features of the in-memory student.
    train_ex, _ = data.load_split("digits", "train", image_size_hint=8)
    test_ex, _ = data.load_split("digits", "test", image_size_hint=8)
    from kd_keras.data import augment

    def feats(ex):
        ds = data.make_eval_dataset(ex, lambda im: augment.center_crop(im, 8), 128)
        return features.extract_features(method.student, ds)

    (xtr, ytr), (xte, yte) = feats(train_ex), feats(test_ex)
    pred = knn.knn_classify(xtr, ytr, xte, k=1)
    assert in_memory["knn"]["majority"]["knn_top1_k1"] == pytest.approx(np.mean(pred == yte))
    recs = [r for r in from_export["results"] if r["protocol"] == "knn"]
    assert {(r["vote"], r["k"], r["metric"]) for r in recs} == {
        (v, k, "top1") for v in ("majority", "weighted") for k in (1, 5)
    } | {(v, 5, "top5") for v in ("majority", "weighted")}
    for r in recs:
        assert r["layer"] == "backbone" and r["eval_split"] == "test" and r["num_test"] == 360
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["knn"] == from_export["knn"]


def test_checkpoint_and_export_give_the_same_features(run):
    run_dir, method = run
    images = np.random.default_rng(1).uniform(size=(6, 8, 8, 3)).astype(np.float32)
    from_ckpt = evaluate.load_model(run_dir, from_checkpoint=True)
    from_export = evaluate.load_model(run_dir)
    assert from_ckpt.run_dir == from_export.run_dir == run_dir
    want = method.student(images, training=False)
    np.testing.assert_allclose(from_ckpt.backbone(images, training=False), want, atol=1e-5)
    np.testing.assert_allclose(from_export.serve(images), want, atol=1e-5)
    assert set(from_ckpt.heads) == set(from_export.heads) == {"head_tt"}
    for loaded in (from_ckpt, from_export):
        np.testing.assert_allclose(
            loaded.heads["head_tt"](want, training=False),
            method.heads[0](want, training=False),
            atol=1e-5,
        )


def test_run_without_export_loads_a_backup_and_restore_checkpoint(run, tmp_path):
    # Runs from before step checkpoints hold Keras BackupAndRestore's latest.weights.h5.
    run_dir, method = run
    copy = tmp_path / "old_run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("export", "checkpoints"))
    (copy / "checkpoints").mkdir()
    method.save_weights(str(copy / "checkpoints" / "latest.weights.h5"))
    loaded = evaluate.load_model(str(copy))
    assert loaded.source.startswith("checkpoint ") and loaded.source.endswith("latest.weights.h5")
    images = np.random.default_rng(4).uniform(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.backbone(images, training=False), method.student(images, training=False), atol=1e-5
    )
    shutil.rmtree(copy / "checkpoints")
    with pytest.raises(evaluate.EvaluationError, match="has neither an export/ nor a checkpoint"):
        evaluate.load_model(str(copy))


def test_layers_backbone_stage_and_head(run):
    run_dir, method = run
    loaded = evaluate.load_model(run_dir)
    images = np.random.default_rng(2).uniform(size=(4, 8, 8, 3)).astype(np.float32)
    # stage1 of convnet_tiny at 8 px is [4, 4, 16]; 64-d backbone -> grid round(sqrt(4)) = 2.
    stage, info = layers.layer_embedding(loaded, "stage1")
    assert info["feature_dim"] == 64 and "2x2" in info["pooling"]
    fmap = keras.Model(loaded.backbone.inputs, loaded.backbone.get_layer("stage1").output)(
        images
    ).numpy()
    want = fmap.reshape(4, 2, 2, 2, 2, 16).mean(axis=(2, 4)).reshape(4, -1)
    np.testing.assert_allclose(stage(images), want, atol=1e-5)
    head_mid, info = layers.layer_embedding(loaded, "head_tt/relu1")
    assert info["feature_dim"] == 128  # mlp2: (m, 2m, d)
    head_out, info = layers.layer_embedding(loaded, "head_tt")
    np.testing.assert_allclose(
        head_out(images),
        method.heads[0](method.student(images, training=False), training=False),
        atol=1e-5,
    )
    with pytest.raises(evaluate.EvaluationError, match="unknown layer; known: backbone, "):
        layers.layer_embedding(loaded, "stage9")
    with pytest.raises(evaluate.EvaluationError, match="head_tt/linear1"):
        layers.layer_embedding(loaded, "head_tt/nope")


def test_adaptive_pool_matches_torch_bins():
    x = np.random.default_rng(3).normal(size=(2, 5, 7, 3)).astype(np.float32)
    got = layers.AdaptiveAveragePooling(3)(x).numpy().reshape(2, 3, 3, 3)
    for i in range(3):
        for j in range(3):
            rows = slice((i * 5) // 3, -(-((i + 1) * 5) // 3))
            cols = slice((j * 7) // 3, -(-((j + 1) * 7) // 3))
            np.testing.assert_allclose(got[:, i, j], x[:, rows, cols].mean(axis=(1, 2)), atol=1e-6)
    assert layers.pooling_grid((None, 4, 4, 16), 512) == 4  # capped by the map size


def test_bad_input_is_one_clear_error(run, tmp_path):
    run_dir, _ = run
    loaded = evaluate.load_model(run_dir)
    with pytest.raises(evaluate.EvaluationError, match=r"--knn_k=2000 exceeds the 288 training"):
        evaluate.evaluate(loaded, _eval_cfg(run_dir, tmp_path, knn_k=(1, 2000), knn_max_train=300))
    with pytest.raises(evaluate.EvaluationError, match="unknown \\['svm'\\]"):
        evaluate.evaluate(loaded, _eval_cfg(run_dir, tmp_path, protocols=("svm",)))
    # A split without labels for a supervised protocol.
    examples, info = data.load_split("digits", "train", image_size_hint=8)
    unlabelled = (examples, dataclasses.replace(info, has_labels=False, num_classes=0))
    with pytest.raises(evaluate.EvaluationError, match="need labels, but split 'train'"):
        evaluate.evaluate(loaded, _eval_cfg(run_dir, tmp_path), train_split=unlabelled)
    # A manifest whose feature dimension does not match the stored SavedModel.
    copy = tmp_path / "export_copy"
    shutil.copytree(os.path.join(run_dir, "export"), copy)
    manifest = json.loads((copy / export.MANIFEST).read_text())
    (copy / export.MANIFEST).write_text(json.dumps({**manifest, "feature_dim": 65}))
    with pytest.raises(
        evaluate.EvaluationError, match="feature_dim=65 but the SavedModel gives 64"
    ):
        evaluate.load_model(str(copy))
    # A SavedModel without the serving signature.
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "nosig"))
    with pytest.raises(evaluate.EvaluationError, match="no 'serving_default' signature"):
        evaluate.load_model(str(tmp_path / "nosig"))


def _cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "kd_keras.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_writes_results_table_plot_and_projector(run, tmp_path):
    run_dir, _ = run
    out = tmp_path / "cli"
    ok = _cli(
        f"--model={run_dir}",
        "--protocols=knn,linear,mse_cos",
        "--knn_k=1,5",
        "--knn_max_train=300",
        "--linear_epochs=3",
        f"--eval_dir={out}",
        "--projector_examples=50",
    )
    assert ok.returncode == 0, ok.stderr
    results = json.loads((out / "results.json").read_text())
    protocols = {r["protocol"] for r in results["results"]}
    assert protocols == {"knn", "linear", "mse_cos"}
    linear = [r for r in results["results"] if r["protocol"] == "linear"]
    assert {r["path"] for r in linear} == {"cached_features"} and linear[0]["preset"] == "simreg"
    mse = next(r for r in results["results"] if r["metric"] == "mse")
    cos = next(r for r in results["results"] if r["metric"] == "cos")
    assert 0 <= mse["value"] <= 4 and -1 <= cos["value"] <= 1
    assert re.search(r"knn +majority k=1 +top1 +0\.\d{4}  288/360", ok.stdout), ok.stdout
    assert (out / "knn_monitor.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "logs" / "projector" / "projector_config.pbtxt").is_file()
    # every 8th of 360 test examples (45) plus a header line
    assert len((out / "logs" / "projector" / "metadata.tsv").read_text().splitlines()) == 46
    acc = EventAccumulator(str(out / "logs"), size_guidance={"tensors": 0})
    acc.Reload()
    assert {"knn/weighted_k5_top1", "linear/simreg_cached_features_top1", "mse_cos/tt_cos"} <= set(
        acc.Tags()["tensors"]
    )
    bad = _cli(f"--model={run_dir}", "--protocols=knn,svm", f"--eval_dir={out}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("kd_keras.evaluate: error: --protocols")
    assert "Traceback" not in bad.stderr
    layer = _cli(f"--model={run_dir}", "--eval_layer=stage7", f"--eval_dir={out}")
    assert layer.returncode == 2 and "kd_keras.evaluate: error: --eval_layer=stage7" in layer.stderr


@pytest.mark.slow
def test_augmented_linear_probe_and_finetune_record_their_path_and_subset(run, tmp_path):
    run_dir, method = run
    before = [w.copy() for w in method.student.get_weights()]
    cfg = _eval_cfg(
        run_dir,
        tmp_path,
        protocols=("linear", "finetune1"),
        linear_path="augmented",
        linear_preset="swav",
        linear_epochs=1,
        finetune_epochs=1,
        eval_max_test=90,
    )
    results = evaluate.evaluate(evaluate.load_model(run_dir), cfg)
    linear = next(r for r in results["results"] if r["protocol"] == "linear")
    assert (linear["path"], linear["preset"], linear["epochs"]) == ("augmented_images", "swav", 1)
    assert results["linear"]["training_images"].startswith("decoded once, kept as uint8")
    tune = next(r for r in results["results"] if r["protocol"] == "finetune1")
    assert tune["fraction"] == 0.01 and tune["num_test"] == linear["num_test"] == 90
    labels = features.label_array(data.load_split("digits", "train", image_size_hint=8)[0], 1437)
    subset = subsets.load_subset(tune["subset_file"], labels=labels)  # checks class counts
    assert tune["num_train"] == subset.num_examples == 10  # 1% of ~144 per class rounds to 1
    np.testing.assert_array_equal(subset.indices, subsets.label_subset(labels, 0.01, seed=0))
    for a, b in zip(before, method.student.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # evaluation never changes the model


def test_bare_savedmodel_serves_the_backbone_layer_only(run, tmp_path):
    run_dir, _ = run
    bare = evaluate.load_model(os.path.join(run_dir, "export", export.SAVED_MODEL_DIR))
    assert bare.backbone is None and bare.run_dir is None
    assert (bare.image_size, bare.feature_dim) == (8, 64)
    from_bare = evaluate.evaluate(bare, _eval_cfg("bare", tmp_path))
    from_export = evaluate.evaluate(
        evaluate.load_model(os.path.join(run_dir, "export")),
        _eval_cfg("export", tmp_path, eval_dir=str(tmp_path / "eval2")),
    )
    assert from_bare["knn"] == from_export["knn"]
    with pytest.raises(evaluate.EvaluationError, match="only 'backbone' is available"):
        layers.layer_embedding(bare, "stage1")
    with pytest.raises(evaluate.EvaluationError, match="need a Keras backbone"):
        evaluate.evaluate(bare, _eval_cfg("bare", tmp_path, protocols=("finetune10",)))
