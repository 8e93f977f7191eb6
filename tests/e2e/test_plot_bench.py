"""tools/plot_bench: a context_sweep JSON becomes an SVG with one line per engine and panel; bad
input is a one-line error."""
import json
import os
import subprocess
import sys
import unittest
import xml.dom.minidom

import common

PLOT = os.path.join(common.REPO, "tools", "plot_bench")


class PlotBenchTest(common.TempDirCase):

    def plot(self, data):
        src = os.path.join(self.tmp, "sweep.json")
        with open(src, "w") as f:
            f.write(data if isinstance(data, str) else json.dumps(data))
        out = os.path.join(self.tmp, "plot.svg")
        r = subprocess.run([sys.executable, PLOT, src, "--out", out], capture_output=True, text=True)
        return r, out

    def test_svg_has_a_line_per_engine_and_panel(self):
        points = [{"engine": e, "context": c, "prefill": p * f, "decode": d * f}
                  for e, f in (("kiln", 2.0), ("llama.cpp", 1.0))
                  for c, p, d in ((512, 200.0, 20.0), (4096, 120.0, 11.0), (16384, 50.0, 5.0))]
        r, out = self.plot({"label": "test", "threads": 2, "points": points})
        self.assertEqual(r.returncode, 0, r.stderr)
        doc = xml.dom.minidom.parse(out)
        lines = doc.getElementsByTagName("polyline")
        self.assertEqual(len(lines), 4)  # 2 engines x 2 panels
        for line in lines:
            self.assertEqual(len(line.getAttribute("points").split()), 3)
        self.assertEqual(len(doc.getElementsByTagName("circle")), 12)

    def test_bad_input_is_one_line(self):
        for data in ("not json", json.dumps({"points": [{"engine": "kiln"}]}), json.dumps({})):
            r, out = self.plot(data)
            self.assertNotEqual(r.returncode, 0)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
            self.assertIn("plot_bench:", r.stderr)
            self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
    unittest.main()
