#!/usr/bin/python3
"""Crash consistency of everything `kiln export` and `kiln adapter` write (issue 12).

kill -9 at random moments spread over the measured duration of an uninterrupted run (seeded, so
the moments are the same on every run; which phase each lands in depends on the machine, and the
assertions hold for every phase):
- `kiln export` to a fresh place: afterwards --out is absent or the new artifact;
- `kiln export --force` over an existing artifact: --out is the old or the new artifact, never
  missing;
- `kiln adapter add` (fresh and --force): the artifact verifies, and the adapter is absent, the
  old or the new one;
each artifact found is byte-compared with an uninterrupted export or add (SOURCE_DATE_EPOCH makes
them reproducible) and accepted by `kiln inspect --verify`. The next successful command leaves no
temporary behind. Also: stale temporaries of a dead export are removed by the next one, a live
one (its lock held) is not; Ctrl-C still exits 130 leaving nothing."""

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

import common
from common import kiln, mf

import lora_ref as L  # noqa: E402  (common puts tests/reference on sys.path)

# ~50 MB of bf16 weights: an export takes a measurable fraction of a second.
FIXTURE = mf.BASE.replace(name="crash", emb_dim=512, num_query_heads=8, num_kv_heads=8,
                          head_dim=64, mlp_dim=1536, num_decoder_layers=8, vocab_size=4096,
                          dtype="bf16", seed=3)
OLD_EPOCH, NEW_EPOCH = "1000000000", "2000000000"
KILLS = 6


def snapshot(path):
    """{relative path: sha256} of every file below `path`; None when it does not exist."""
    if not os.path.lexists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def temporaries(directory):
    return sorted(n for n in os.listdir(directory) if ".kiln-" in n)


def run_env(epoch):
    return dict(os.environ, SOURCE_DATE_EPOCH=epoch)


class CrashConsistencyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="kiln-crash-")
        cls.fx = mf.write_fixture(FIXTURE, os.path.join(cls.tmp, "fixture"))
        cls.refs = {}
        cls.seconds = {}
        for label, epoch in (("old", OLD_EPOCH), ("new", NEW_EPOCH)):
            ref = os.path.join(cls.tmp, label + ".kiln")
            t0 = time.monotonic()
            subprocess.run(cls.export_argv(ref), env=run_env(epoch), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cls.seconds[label] = time.monotonic() - t0
            cls.refs[label] = snapshot(ref)
        cls.duration = max(cls.seconds.values())
        common.log("    uninterrupted export of %.1f MiB: %.2f s" % (
            sum(os.path.getsize(os.path.join(cls.tmp, "new.kiln", f))
                for f in os.listdir(os.path.join(cls.tmp, "new.kiln"))) / 2 ** 20, cls.duration))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def export_argv(cls, out, *extra):
        return [common.KILN, "export", *cls.fx.export_args(), "--out", out, *extra]

    def setUp(self):
        common.require_kiln(self)
        self.work = tempfile.mkdtemp(prefix="kiln-crash-case-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.parent = os.path.join(self.work, "out")
        os.makedirs(self.parent)
        self.out = os.path.join(self.parent, "model.kiln")
        self.rng = random.Random(20240612)

    def moments(self, duration):
        """KILLS moments spread over [0, 1.1 duration]: one at random in each equal slice."""
        return [(i + self.rng.random()) / KILLS * 1.1 * duration for i in range(KILLS)]

    def kill_at(self, argv, seconds, epoch):
        p = subprocess.Popen(argv, env=run_env(epoch), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        time.sleep(seconds)
        p.send_signal(signal.SIGKILL)
        return p.wait()

    def export_ok(self, epoch, *extra):
        p = subprocess.run(self.export_argv(self.out, *extra), env=run_env(epoch),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        return p.stderr.decode()

    def which(self, allowed):
        """The name of the artifact at --out among `allowed` ("absent", "old", "new")."""
        snap = snapshot(self.out)
        state = "absent" if snap is None else next(
            (k for k in ("old", "new") if snap == self.refs[k]), "other")
        self.assertIn(state, allowed, "after a kill --out is %s (files %s)" % (
            state, sorted(snap or [])))
        if snap is not None:
            self.assertKilnOk(kiln("inspect", self.out, "--verify"))
        return state

    def assertKilnOk(self, res):
        self.assertEqual(res.rc, 0, res.describe())

    def test_kill_export_to_a_fresh_place(self):
        seen = []
        for t in self.moments(self.duration):
            if os.path.exists(self.out):
                shutil.rmtree(self.out)
            rc = self.kill_at(self.export_argv(self.out), t, NEW_EPOCH)
            seen.append("%.2fs:%s%s" % (t, self.which({"absent", "new"}),
                                        "" if rc == -signal.SIGKILL else "(done)"))
            seen[-1] += "+%d tmp" % len(temporaries(self.parent))
        common.log("    kills (moment:state): " + ", ".join(seen))
        if os.path.exists(self.out):
            shutil.rmtree(self.out)
        self.export_ok(NEW_EPOCH)
        self.assertEqual(os.listdir(self.parent), ["model.kiln"])
        self.assertEqual(snapshot(self.out), self.refs["new"])

    def test_kill_export_force_over_an_existing_artifact(self):
        seen = []
        for t in self.moments(self.duration):
            if snapshot(self.out) != self.refs["old"]:
                self.export_ok(OLD_EPOCH, "--force")
            rc = self.kill_at(self.export_argv(self.out, "--force"), t, NEW_EPOCH)
            seen.append("%.2fs:%s%s+%d tmp" % (t, self.which({"old", "new"}),
                                               "" if rc == -signal.SIGKILL else "(done)",
                                               len(temporaries(self.parent))))
        common.log("    kills (moment:state): " + ", ".join(seen))
        self.export_ok(NEW_EPOCH, "--force")
        self.assertEqual(os.listdir(self.parent), ["model.kiln"])
        self.assertEqual(snapshot(self.out), self.refs["new"])

    def test_kill_adapter_add(self):
        art = os.path.join(self.work, "art.kiln")
        shutil.copytree(os.path.join(self.tmp, "old.kiln"), art)
        ads = {}
        for label, r in (("old", 16), ("new", 32)):
            ads[label] = L.write_adapter(self.fx, L.AdapterSpec(
                targets=("q", "k", "v", "o", "wi_0", "wi_1", "wo"), r=r, seed=r),
                os.path.join(self.work, "adapter-" + label))

        def add(label, *extra):
            res = kiln("adapter", "add", art, ads[label].directory, "--name", "ad", *extra)
            self.assertKilnOk(res)
            return res

        def adapter_state():
            self.assertKilnOk(kiln("inspect", art, "--verify"))
            res = kiln("adapter", "list", art, "--json")
            self.assertKilnOk(res)
            listed = {a["name"]: a for a in json.loads(res.stdout)["adapters"]}
            if "ad" not in listed:
                return "absent"
            return {16: "old", 32: "new"}[listed["ad"]["rank"]]

        t0 = time.monotonic()
        add("old")
        duration = max(time.monotonic() - t0, 0.05)
        seen = []
        for i, t in enumerate(self.moments(duration)):
            force = i % 2 == 0  # replace the old adapter, or add to an artifact without one
            if force and adapter_state() != "old":
                add("old", "--force")
            if not force and adapter_state() != "absent":
                self.assertKilnOk(kiln("adapter", "remove", art, "ad"))
            argv = [common.KILN, "adapter", "add", art, ads["new"].directory, "--name", "ad"]
            rc = self.kill_at(argv + (["--force"] if force else []), t, NEW_EPOCH)
            state = adapter_state()
            self.assertIn(state, {"old", "absent", "new"} if force else {"absent", "new"})
            seen.append("%.2fs:%s%s%s" % (t, "force:" if force else "", state,
                                          "" if rc == -signal.SIGKILL else "(done)"))
        common.log("    adapter add %.2f s; kills (moment:state): %s" % (duration,
                                                                          ", ".join(seen)))
        add("new", "--force")
        self.assertEqual(adapter_state(), "new")
        self.assertEqual(temporaries(art), [])
        self.assertEqual(os.listdir(os.path.join(art, "adapters")), ["ad"])

    def test_stale_temporaries_removed_live_ones_kept(self):
        pid_dead, pid_live = 999999991, 999999992
        dead = os.path.join(self.parent, ".model.kiln.kiln-tmp-%d" % pid_dead)
        old = os.path.join(self.parent, ".model.kiln.kiln-old-%d" % pid_dead)
        live = os.path.join(self.parent, ".model.kiln.kiln-tmp-%d" % pid_live)
        for d in (dead, old, live):
            os.makedirs(d)
            with open(os.path.join(d, "layer-000.kblob"), "wb") as f:
                f.write(b"\0" * 4096)
        other = os.path.join(self.parent, ".other.kiln.kiln-tmp-%d" % pid_dead)
        os.makedirs(other)
        # A live export to the same place: another process holds the lock on its directory.
        holder = subprocess.Popen(
            ["/usr/bin/python3", "-c",
             "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
             "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
             live], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), b"locked")
        err = self.export_ok(NEW_EPOCH)
        self.assertEqual(sorted(os.listdir(self.parent)),
                         sorted(["model.kiln", os.path.basename(live), os.path.basename(other)]))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        self.assertEqual(lines, ["kiln: removed %s, left by an interrupted kiln command" % p
                                 for p in sorted([dead, old])])
        common.log("    " + "\n    ".join(lines))
        holder.stdin.close()  # the live export ends: its lock is released
        holder.wait()
        self.export_ok(NEW_EPOCH, "--force")
        self.assertEqual(sorted(os.listdir(self.parent)),
                         sorted(["model.kiln", os.path.basename(other)]))

    def test_stale_calibration_scratch_and_file_temporaries(self):
        # the scratch space of a killed --qk-clip-calibrate, as this and earlier builds name it
        for n in (".model.kiln.kiln-calibrate-999999991", "model.kiln.kiln-calibrate-999999991",
                  ".model.kiln.kiln-calibrate-999999991.kiln-tmp-999999991"):
            os.makedirs(os.path.join(self.parent, n))
        self.export_ok(NEW_EPOCH)
        self.assertEqual(os.listdir(self.parent), ["model.kiln"])
        # single files: a golden dump killed mid-write leaves a temporary the next one removes
        npy = os.path.join(self.parent, "g.npy")
        with open(os.path.join(self.parent, ".g.npy.kiln-tmp-999999991"), "wb") as f:
            f.write(b"half")
        self.assertKilnOk(kiln("golden", "dump", self.out, "--tokens", "1,2,3", "--out", npy))
        self.assertEqual(sorted(os.listdir(self.parent)), ["g.npy", "model.kiln"])

    def test_ctrl_c_exits_130_and_leaves_nothing(self):
        p = subprocess.Popen(self.export_argv(self.out), env=run_env(NEW_EPOCH),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(self.duration / 2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate()
        # 0 when the export finished before the signal arrived (then it is complete)
        self.assertIn(p.returncode, (130, 0), err.decode())
        if p.returncode == 130:
            self.assertEqual(os.listdir(self.parent), [], err.decode())
            self.assertIn("interrupted", err.decode())
        else:
            self.assertEqual(os.listdir(self.parent), ["model.kiln"])


if __name__ == "__main__":
    unittest.main()
