"""The benchmarks' shared shapes: one vocabulary, one arithmetic, no import cycles."""

import ast
import sys

from keras_mixer import MLPMixer
from conftest import ROOT
from conftest import once

sys.path.insert(0, str(ROOT / "benchmarks"))
import shapes  # noqa: E402

BENCHMARKS = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}


def test_configs_build_models_whose_parameters_the_arithmetic_counts():
    for name, cfg in shapes.CONFIGS.items():
        model = MLPMixer(**shapes.arch(cfg))
        assert model.num_tokens == shapes.num_tokens(cfg), name
        assert model.count_params() == shapes.parameter_count(cfg), name


def test_the_forward_flops_are_the_forward_gemms_plus_nothing_else():
    """The two counts of one training step agree: the forward GEMMs (every
    third entry) are the forward FLOPs at the batch, and the backward ones double them."""
    for cfg in shapes.CONFIGS.values():
        gemms = shapes.training_gemms(cfg)
        forward = sum(2 * m * k * n * count for m, k, n, count in gemms[::3])
        assert forward == cfg["batch"] * shapes.forward_flops(cfg)
        assert sum(2 * m * k * n * count for m, k, n, count in gemms) == 3 * forward


def test_benchmark_scripts_import_each_other_without_a_cycle():
    graph = {}
    for name, path in BENCHMARKS.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.add(node.module)
        graph[name] = found & set(BENCHMARKS)

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n,))) for n in graph[start])

    assert not [name for name in graph if reaches(name, name)]
    assert "shapes" in graph["bench_model"] and "shapes" in graph["gemm_peak"]


@once("it reads XML files; no backend work")
def test_ci_times_sums_each_module_per_pass_from_junit_files(tmp_path):
    import ci_times

    def junit(*cases):
        return ("<testsuites><testsuite>" + "".join(
            f'<testcase classname="{c}" name="{n}" time="{t}"/>' for c, n, t in cases) + "</testsuite></testsuites>")

    (tmp_path / "jax.xml").write_text(junit(("tests.test_a", "test_1", 10.5), ("tests.test_a", "test_2", 2),
                                            ("tests.test_b.TestGroup", "test_3", 30)))
    (tmp_path / "torch.xml").write_text(junit(("tests.test_a", "test_1", 4)))
    names, rows = ci_times.module_table(ci_times.read(tmp_path))
    assert names == ["jax", "torch"]
    assert rows == [("test_b", 30, 0, 30), ("test_a", 12.5, 4, 16.5), ("total", 42.5, 4, 46.5)]
    assert ci_times.slowest(ci_times.read(tmp_path), 2) == [
        (30, "jax", "test_b::TestGroup::test_3"), (10.5, "jax", "test_a::test_1")]
