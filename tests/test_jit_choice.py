"""--jit_compile unset picks XLA per machine and input size; an explicit value always wins."""

from kd_keras import precision


def test_explicit_value_wins():
    assert precision.choose_jit_compile(True, 16, True, [], {"avx512f"})[0] is True
    assert precision.choose_jit_compile(False, 224, False, [(8, 0)], set())[0] is False


def test_auto_by_device_and_size():
    on_gpu, why = precision.choose_jit_compile(None, 16, True, [(8, 0)], {"avx512f"})
    assert on_gpu and "GPU" in why
    on_cpu, why = precision.choose_jit_compile(None, 112, False, [], {"avx2", "avx512f"})
    assert on_cpu and "AVX-512" in why
    assert not precision.choose_jit_compile(None, 112, True, [], {"avx512f"})[0]
    assert precision.choose_jit_compile(None, 32, False, [], {"avx2"}) == (
        False,
        "auto: AVX2 CPU, 32 px < 64 px",
    )


def test_grouped_conv_students_stay_off_xla_on_cpu_only():
    from kd_keras import backbones, train

    off, why = precision.choose_jit_compile(None, 112, False, [], {"avx512f"}, grouped_convs=True)
    assert off is False and "grouped" in why
    assert precision.choose_jit_compile(None, 112, False, [(8, 0)], set(), grouped_convs=True)[0]
    assert precision.choose_jit_compile(True, 112, False, [], set(), grouped_convs=True)[0]
    regnet = backbones.build_regnet("regnety-1.1-8.16-g4-stem8", 32)
    resnet = backbones.build_backbone("resnet_tiny", 32)
    assert train._has_grouped_convs(regnet) and not train._has_grouped_convs(resnet)
