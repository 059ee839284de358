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
