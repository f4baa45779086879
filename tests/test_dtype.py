"""The dtype follows the CPU's capability: bfloat16 with AVX512-BF16 or AMX and on GPUs, float32 elsewhere."""
import pytest

from qprobe import hfmodel

AVX2 = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}  # AVX512 without its bf16 extension


@pytest.fixture
def flags(monkeypatch):
    def fake(value):
        monkeypatch.setattr(hfmodel, "cpu_flags", lambda: frozenset(value))
    return fake


@pytest.mark.parametrize("cpu, expected", [
    (AVX2, "float32"),
    (AVX512, "float32"),
    (AVX512 | {"avx512_bf16"}, "bfloat16"),
    (AVX2 | {"amx_bf16", "amx_tile"}, "bfloat16"),
    (frozenset(), "float32"),  # no /proc/cpuinfo (macOS): the safe choice
])
def test_the_cpu_default_follows_the_flags(flags, cpu, expected):
    flags(cpu)
    assert hfmodel.default_dtype("cpu") == expected
    assert hfmodel.dtype_name("cpu", None) == expected  # what a feature identity records


def test_a_gpu_is_bfloat16_and_an_explicit_dtype_wins(flags):
    flags(AVX2)
    assert hfmodel.default_dtype("cuda") == hfmodel.default_dtype("cuda:1") == "bfloat16"
    pytest.importorskip("torch")
    flags(AVX512 | {"avx512_bf16"})
    assert hfmodel.dtype_name("cpu", "float32") == "float32"
    assert str(hfmodel.pick_device_dtype("cpu", None)[1]) == "torch.bfloat16"


def test_cpu_flags_reads_this_machine():
    flags = hfmodel.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == frozenset()
        return
    assert ("avx2" in flags) == (" avx2" in text)


def test_serve_computes_in_the_probes_dtype(flags):
    from qprobe.errors import QProbeError
    from qprobe.serve.backends import LocalBackend

    ex = {"kind": "hf", "model": "m", "layer": -1, "pooling": "last", "dtype": "float32"}
    flags(AVX512 | {"avx512_bf16"})  # the machine would pick bfloat16, the probe was trained on float32
    assert LocalBackend("m", ex).dtype == "float32"
    assert LocalBackend("m", ex, dtype="float32").dtype == "float32"
    with pytest.raises(QProbeError, match="trained on float32"):
        LocalBackend("m", ex, dtype="bfloat16")
    assert LocalBackend("m", None).dtype is None  # no recorded dtype: the machine's default


def test_speed_flags_names_only_the_flags_that_matter(flags):
    flags(AVX512 | {"avx512_bf16", "sse4_2"})
    assert hfmodel.speed_flags() == "avx2 avx512_bf16 avx512_vnni avx512bw avx512f"
    flags(frozenset({"sse2"}))
    assert hfmodel.speed_flags() == "none of avx2/avx512/amx"
