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
from common import kiln, mf, st

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
        # Uninterrupted exports, byte-compared with what a kill leaves (--force is recorded in
        # the manifest, so each mode has its own).
        cls.refs = {}
        cls.seconds = []
        for label, epoch, extra in (("old", OLD_EPOCH, ["--force"]), ("new", NEW_EPOCH, []),
                                    ("new", NEW_EPOCH, ["--force"])):
            ref = os.path.join(cls.tmp, label + "".join(extra) + ".kiln")
            t0 = time.monotonic()
            subprocess.run(cls.export_argv(ref, *extra), env=run_env(epoch), check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cls.seconds.append(time.monotonic() - t0)
            cls.refs[label, bool(extra)] = snapshot(ref)
        cls.duration = max(cls.seconds)
        new = os.path.join(cls.tmp, "new.kiln")
        common.log("    uninterrupted export of %.1f MiB: %s s" % (
            sum(os.path.getsize(os.path.join(new, f)) for f in os.listdir(new)) / 2 ** 20,
            ", ".join("%.2f" % t for t in cls.seconds)))

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
        """KILLS moments spread over [0, 1.4 duration]: one at random in each equal slice (a
        killed run also removes its predecessor's temporary first, so it runs a little longer
        than the measured one, and the last slices reach its final rename)."""
        return [(i + self.rng.random()) / KILLS * 1.4 * duration for i in range(KILLS)]

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

    def which(self, allowed, force):
        """What --out is: "absent", "old" or "new" (of an export with or without --force), which
        must be in `allowed`; a present artifact must pass `kiln inspect --verify`."""
        snap = snapshot(self.out)
        known = {"old": self.refs["old", True], "new": self.refs["new", force]}
        state = "absent" if snap is None else next(
            (k for k, ref in known.items() if snap == ref), "other")
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
            seen.append("%.2fs:%s%s" % (t, self.which({"absent", "new"}, False),
                                        "" if rc == -signal.SIGKILL else "(done)"))
            seen[-1] += "+%d tmp" % len(temporaries(self.parent))
        common.log("    kills (moment:state): " + ", ".join(seen))
        if os.path.exists(self.out):
            shutil.rmtree(self.out)
        self.export_ok(NEW_EPOCH)
        self.assertEqual(os.listdir(self.parent), ["model.kiln"])
        self.assertEqual(snapshot(self.out), self.refs["new", False])

    def test_kill_export_force_over_an_existing_artifact(self):
        seen = []
        for t in self.moments(self.duration):
            if snapshot(self.out) != self.refs["old", True]:
                self.export_ok(OLD_EPOCH, "--force")
            rc = self.kill_at(self.export_argv(self.out, "--force"), t, NEW_EPOCH)
            seen.append("%.2fs:%s%s+%d tmp" % (t, self.which({"old", "new"}, True),
                                               "" if rc == -signal.SIGKILL else "(done)",
                                               len(temporaries(self.parent))))
        common.log("    kills (moment:state): " + ", ".join(seen))
        self.export_ok(NEW_EPOCH, "--force")
        self.assertEqual(os.listdir(self.parent), ["model.kiln"])
        self.assertEqual(snapshot(self.out), self.refs["new", True])

    def test_kill_adapter_add(self):
        art = os.path.join(self.work, "art.kiln")
        shutil.copytree(os.path.join(self.tmp, "new.kiln"), art)
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


DEFAULT = os.path.join(common.REPO, "models", "default")
FINISHED = "finished an adapter change a killed kiln command had committed (manifest.kfb from " \
    ".manifest.kfb.kiln-next-4242)"


def copy_file(src, dst):
    shutil.copyfile(src, dst)


class AdapterRecoveryTest(common.TempDirCase):
    """Each state a kill of `kiln adapter add --force` / `remove` can leave, built file by file
    (the kill loop above hits them only by chance): the artifact verifies as it is, and the next
    adapter command finishes a committed change or undoes an uncommitted one, leaving no
    temporary. Old adapter: the default model's; new: the same with B doubled (other blobs)."""

    PID = "4242"

    def setUp(self):
        super().setUp()
        common.require_kiln(self)
        self.env = os.environ.get("SOURCE_DATE_EPOCH")
        os.environ["SOURCE_DATE_EPOCH"] = NEW_EPOCH
        self.addCleanup(self.restore_env)
        base = os.path.join(self.tmp, "base.kiln")
        self.ok(kiln("export", "--checkpoint", os.path.join(DEFAULT, "model.safetensors"),
                     "--config", os.path.join(DEFAULT, "config.yml"), "--out", base))
        self.old_adapter = os.path.join(DEFAULT, "adapter")
        self.new_adapter = os.path.join(self.tmp, "adapter2")
        os.makedirs(self.new_adapter)
        copy_file(os.path.join(self.old_adapter, "adapter_config.json"),
                  os.path.join(self.new_adapter, "adapter_config.json"))
        weights = st.read_safetensors(os.path.join(self.old_adapter, "adapter.safetensors"))
        st.write_safetensors(os.path.join(self.new_adapter, "adapter.safetensors"),
                             {k: (v * (2 if "lora_b" in k else 1), "F32")
                              for k, v in weights.items()})
        # the three manifests and both adapter directories the states are made of
        self.art = os.path.join(self.tmp, "art.kiln")
        shutil.copytree(base, self.art)
        self.add(self.art, "ad", self.old_adapter)
        new = os.path.join(self.tmp, "new.kiln")
        shutil.copytree(self.art, new)
        self.add(new, "ad", self.new_adapter, "--force")
        self.new_manifest = self.read(new, "manifest.kfb")
        self.new_dir = os.path.join(new, "adapters", "ad")
        without = os.path.join(self.tmp, "without.kiln")
        shutil.copytree(self.art, without)
        self.ok(kiln("adapter", "remove", without, "ad"))
        self.without_manifest = self.read(without, "manifest.kfb")
        self.adapters = os.path.join(self.art, "adapters")
        self.staged = os.path.join(self.adapters, ".ad.kiln-tmp-" + self.PID)
        self.journal = os.path.join(self.art, ".manifest.kfb.kiln-next-" + self.PID)

    def restore_env(self):
        if self.env is None:
            os.environ.pop("SOURCE_DATE_EPOCH", None)
        else:
            os.environ["SOURCE_DATE_EPOCH"] = self.env

    def ok(self, res):
        self.assertEqual(res.rc, 0, res.describe())
        return res

    def add(self, art, name, adapter, *extra):
        return self.ok(kiln("adapter", "add", art, adapter, "--name", name, *extra))

    @staticmethod
    def read(art, name):
        with open(os.path.join(art, name), "rb") as f:
            return f.read()

    def write(self, name, data):
        with open(os.path.join(self.art, name), "wb") as f:
            f.write(data)

    def state_of_ad(self):
        """Adapter 'ad' is "old", "new" or None (absent); the artifact must verify as it is."""
        self.ok(kiln("inspect", self.art, "--verify"))
        listed = json.loads(self.ok(kiln("adapter", "list", self.art, "--json")).stdout)
        source = {a["name"]: a["source"] for a in listed["adapters"]}.get("ad")
        return {None: None, self.old_adapter: "old", self.new_adapter: "new"}[source]

    def recover(self, want_state, want_lines):
        """The next adapter command (remove of a second adapter, added first) cleans up."""
        before = self.state_of_ad()
        res = self.ok(kiln("adapter", "list", self.art))  # read-only: changes nothing
        self.assertEqual(self.state_of_ad(), before)
        res = self.add(self.art, "other", self.old_adapter)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        self.assertEqual(len(lines), len(want_lines), res.describe())
        for line, want in zip(lines, want_lines):
            self.assertIn(want, line, res.describe())
        common.log("    %-40s %s" % (self._testMethodName, " | ".join(lines) or "(nothing)"))
        self.ok(kiln("adapter", "remove", self.art, "other"))
        self.assertEqual(self.state_of_ad(), want_state)
        self.assertEqual([n for n in os.listdir(self.art) if n.startswith(".")], [])
        if os.path.isdir(self.adapters):
            self.assertEqual(os.listdir(self.adapters), ["ad"] if want_state else [])

    def test_killed_after_the_swap_is_finished(self):
        # journal written, manifest without 'ad', directories exchanged, old one not yet removed
        os.rename(os.path.join(self.adapters, "ad"), self.staged)
        shutil.copytree(self.new_dir, os.path.join(self.adapters, "ad"))
        self.write(os.path.basename(self.journal), self.new_manifest)
        self.write("manifest.kfb", self.without_manifest)
        self.assertIsNone(self.state_of_ad())  # meanwhile absent, and the artifact loads
        self.recover("new", [FINISHED, "removed " + self.staged])

    def test_killed_after_committing_before_the_swap(self):
        shutil.copytree(self.new_dir, self.staged)
        self.write(os.path.basename(self.journal), self.new_manifest)
        self.assertEqual(self.state_of_ad(), "old")
        self.recover("new", [FINISHED])  # the swap itself removes the old directory

    def test_killed_before_committing(self):
        shutil.copytree(self.new_dir, self.staged)
        os.remove(os.path.join(self.staged, sorted(os.listdir(self.staged))[-1]))
        self.write(".manifest.kfb.kiln-tmp-" + self.PID, self.new_manifest[:100])
        self.recover("old", ["removed " + os.path.join(self.art, ".manifest.kfb.kiln-tmp-"),
                         "removed " + self.staged])

    def test_a_journal_whose_blobs_are_incomplete_is_undone(self):
        shutil.copytree(self.new_dir, self.staged)
        os.remove(os.path.join(self.staged, sorted(os.listdir(self.staged))[0]))
        self.write(os.path.basename(self.journal), self.new_manifest)
        self.recover("old", ["removed " + self.journal, "removed " + self.staged])

    def test_remove_killed_after_the_manifest(self):
        self.write("manifest.kfb", self.without_manifest)
        self.assertIsNone(self.state_of_ad())
        self.recover(None, ["removed " + os.path.join(self.adapters, "ad")])
        self.assertFalse(os.path.exists(self.adapters))


if __name__ == "__main__":
    unittest.main()
