"""The benchmarks' shared shapes: one vocabulary, one arithmetic, no import cycles."""

import ast
import sys

from keras_mixer import MLPMixer
from conftest import ROOT

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
