#!/usr/bin/python3
"""A non-finite weight is refused at export (issue 12): exit 1, one `kiln: error:` line naming the
source file, the source key, the artifact tensor (and layer), the NaN/Inf counts and the first
offending index; nothing is left at --out or beside it. Covers a scanned layer tensor, the
streamed embedding, and a finite f32 value beyond the bf16 range (it would round to Inf)."""

import os
import unittest

import numpy as np

import common
from common import kiln, mf, st

BASE = mf.BASE.replace(name="nonfinite", seed=7)
LAYERS = "params.params.decoder.layers."


class NonFiniteWeightsTest(common.TempDirCase):
    def setUp(self):
        super().setUp()
        common.require_kiln(self)
        self.fx = mf.write_fixture(BASE, os.path.join(self.tmp, "fixture"))
        self.ckpt = self.fx.checkpoint_files[0]
        self.parent = os.path.join(self.tmp, "out")
        os.makedirs(self.parent)
        self.out = os.path.join(self.parent, "model.kiln")

    def rewrite(self, key, change):
        """Applies change(array) to one tensor of the checkpoint, in place."""
        tensors = st.read_safetensors(self.ckpt)
        self.assertIn(key, tensors, sorted(tensors))
        change(tensors[key])
        st.write_safetensors(self.ckpt, {k: (v, "F32") for k, v in tensors.items()})

    def assertRefused(self, key, where, nan, inf, first):
        res = kiln("export", "--checkpoint", self.ckpt, "--config", self.fx.config_path,
                   "--out", self.out)
        self.assertEqual(res.rc, 1, res.describe())
        self.assertEqual(len(res.stderr_lines), 1, res.describe())
        msg = res.stderr_lines[0]
        self.assertTrue(msg.startswith("kiln: error: " + self.ckpt + ": key '" + key + "'"),
                        res.describe())
        for part in (where, "%d NaN and %d infinite" % (nan, inf), "first at flat index %d" % first):
            self.assertIn(part, msg, res.describe())
        self.assertFalse(os.path.exists(self.out), "a refused export left %s" % self.out)
        self.assertEqual(os.listdir(self.parent), [], "leftovers beside --out")
        common.log("    %-36s %s" % (self._testMethodName, msg))

    def test_nan_and_inf_in_a_scanned_layer_tensor(self):
        # mlp/wi_0/kernel is stacked [E, L, F] (scan axis 1); layer 1 holds [E, F].
        F = BASE.mlp_dim

        def poison(a):
            a[3, 1, 5] = np.inf
            a[2, 1, 7] = np.nan
            a[4, 1, 0] = np.nan
            a[0, 0, 9] = 1.0  # layer 0 stays finite
        key = LAYERS + "mlp.wi_0.kernel"
        self.rewrite(key, poison)
        self.assertRefused(key, "layer 1 tensor 'mlp.wi_0'", 2, 1, 2 * F + 7)

    def test_nan_in_the_embedding(self):
        E = BASE.emb_dim
        key = "params.params.token_embedder.embedding"
        self.rewrite(key, lambda a: a.__setitem__((10, 3), np.nan))
        self.assertRefused(key, "tensor 'token_embedding'", 1, 0, 10 * E + 3)

    def test_a_finite_value_beyond_the_bf16_range(self):
        key = LAYERS + "mlp.wo.kernel"
        # [F, L, E]: layer 0, row 1, column 2; rounds up past the largest bf16 value
        self.rewrite(key, lambda a: a.__setitem__((1, 0, 2), np.float32(3.4e38)))
        self.assertRefused(key, "layer 0 tensor 'mlp.wo'", 0, 1, 1 * BASE.emb_dim + 2)


if __name__ == "__main__":
    unittest.main()
