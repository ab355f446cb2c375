"""Where CI's time goes: seconds per test module and pass, from the junit
files of one `tests/run_all_backends.sh` run kept with REPORTS_DIR.

    REPORTS_DIR=/tmp/reports bash tests/run_all_backends.sh
    python benchmarks/ci_times.py /tmp/reports [--top 25]

A test's time is its setup, call and teardown (pytest's junit default), so
a module-scoped fixture counts in the first test that uses it. The passes
of one stream run one after the other and the two streams side by side on
the same cores: a second saved in either stream is CPU time the other gets.
"""

import argparse
import collections
import pathlib
import xml.etree.ElementTree as ET


def read(directory):
    """{pass: [(module, test name, seconds)]} from directory/*.xml."""
    passes = {}
    for report in sorted(pathlib.Path(directory).glob("*.xml")):
        root = ET.parse(report).getroot()
        cases = []
        for case in root.iter("testcase"):
            module = case.get("classname", "").split(".")[-1] or "?"
            if module.startswith("test_") or module == "?":
                name = case.get("name")
            else:  # a test in a class: classname is tests.test_x.Class
                module, name = case.get("classname").split(".")[-2], f"{module}::{case.get('name')}"
            cases.append((module, name, float(case.get("time", 0))))
        passes[report.stem] = cases
    return passes


def module_table(passes):
    """Rows (module, seconds per pass..., total), largest total first, then a total row."""
    names = list(passes)
    seconds = collections.defaultdict(lambda: dict.fromkeys(names, 0.0))
    for name, cases in passes.items():
        for module, _, time in cases:
            seconds[module][name] += time
    rows = [(module, *(by_pass[n] for n in names), sum(by_pass.values())) for module, by_pass in seconds.items()]
    rows.sort(key=lambda row: -row[-1])
    totals = [sum(row[i] for row in rows) for i in range(1, len(names) + 2)]
    return names, rows + [("total", *totals)]


def slowest(passes, top):
    """The `top` slowest (seconds, pass, module::test) over every pass."""
    tests = [(time, name, f"{module}::{test}") for name, cases in passes.items() for module, test, time in cases]
    return sorted(tests, reverse=True)[:top]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", help="the REPORTS_DIR of one run_all_backends.sh run")
    parser.add_argument("--top", type=int, default=25, help="how many of the slowest tests to list")
    args = parser.parse_args()
    passes = read(args.reports)
    if not passes:
        raise SystemExit(f"error: no junit .xml files in {args.reports}: run "
                         f"REPORTS_DIR={args.reports} bash tests/run_all_backends.sh first")
    names, rows = module_table(passes)
    print("| module | " + " | ".join(names) + " | all |")
    print("|---" * (len(names) + 2) + "|")
    for module, *values in rows:
        print(f"| {module} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    print(f"\nslowest {args.top} tests (setup + call + teardown):")
    for time, name, test in slowest(passes, args.top):
        print(f"{time:7.1f} s  {name:<10} {test}")


if __name__ == "__main__":
    main()
