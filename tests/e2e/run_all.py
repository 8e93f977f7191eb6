#!/usr/bin/python3
"""Run every tests/e2e/test_*.py module (stdlib unittest) and print a summary.

The LAST line printed is exactly `N passed, N failed`. Skipped tests and expected failures that
unexpectedly pass are counted as failed (nothing is allowed to be skipped silently).

    tests/e2e/run_all.py [-k SUBSTRING] [-x MODULE]... [-q] [module ...]
Environment: KILN=/path/to/kiln (default build/kiln relative to the repo root).
"""

import argparse
import glob
import importlib
import os
import sys
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class CountingResult(unittest.TextTestResult):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.passed = []
        self.durations = {}
        self._t0 = {}

    def startTest(self, test):
        self._t0[test.id()] = time.time()
        super().startTest(test)

    def stopTest(self, test):
        self.durations[test.id()] = time.time() - self._t0.get(test.id(), time.time())
        super().stopTest(test)

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed.append(test)


def iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from iter_tests(t)
        else:
            yield t


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="*", help="module names (default: every test_*.py)")
    ap.add_argument("-k", dest="pattern", help="only tests whose id contains this substring")
    ap.add_argument("-x", dest="exclude", action="append", default=[],
                    help="leave this module out (repeatable)")
    ap.add_argument("-q", "--quiet", action="store_true")
    a = ap.parse_args(argv)

    names = a.modules or sorted(os.path.splitext(os.path.basename(p))[0]
                                for p in glob.glob(os.path.join(HERE, "test_*.py")))
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    import_failures = []
    for name in names:
        name = os.path.splitext(os.path.basename(name))[0]
        if name in a.exclude:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - an import error is a failed test, not a crash
            import_failures.append((name, traceback.format_exc()))
            continue
        suite.addTests(loader.loadTestsFromModule(mod))
    if a.pattern:
        suite = unittest.TestSuite(t for t in iter_tests(suite) if a.pattern in t.id())

    t0 = time.time()
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if a.quiet else 2,
                                     resultclass=CountingResult)
    result = runner.run(suite)
    elapsed = time.time() - t0

    failed_ids = [t.id() for t, _ in result.failures + result.errors]
    failed_ids += ["%s (skipped: %s)" % (t.id(), why) for t, why in result.skipped]
    failed_ids += ["%s (unexpected success)" % t.id() for t in result.unexpectedSuccesses]
    failed_ids += ["%s (expected failure)" % t.id() for t, _ in result.expectedFailures]
    for name, tb in import_failures:
        print("IMPORT ERROR in %s:\n%s" % (name, tb))
        failed_ids.append("%s (import error)" % name)
    n_pass = len(result.passed)
    n_fail = len(failed_ids)
    print("-" * 70)
    slow = sorted(result.durations.items(), key=lambda kv: -kv[1])[:5]
    print("slowest: " + ", ".join("%s %.1fs" % (k.split(".")[-1], v) for k, v in slow))
    print("total time %.1fs" % elapsed)
    for fid in failed_ids:
        print("FAILED: %s" % fid)
    print("%d passed, %d failed" % (n_pass, n_fail))
    return 0 if n_fail == 0 and n_pass > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
