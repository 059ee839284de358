"""--jit_compile unset picks XLA per machine; an explicit value always wins."""

from kd_keras import precision


def test_explicit_value_wins():
    assert precision.choose_jit_compile(True, [(8, 0)], {"avx512f"})[0] is True
    assert precision.choose_jit_compile(False, [(8, 0)], set())[0] is False


def test_auto_by_device():
    on_gpu, why = precision.choose_jit_compile(None, [(8, 0)], {"avx512f"})
    assert on_gpu and "GPU" in why
    on_cpu, why = precision.choose_jit_compile(None, [], {"avx2", "avx512f"})
    assert on_cpu and "AVX-512" in why
    assert precision.choose_jit_compile(None, [], {"avx2", "fma"}) == (
        True,
        "auto: AVX2 CPU, where XLA measured faster (docs/benchmarks.md)",
    )
