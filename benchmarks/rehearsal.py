"""The cluster path rehearsed on one machine: a second Ray node with its own disk, an S3 server.

Run:  make rehearsal        (or: .venv/bin/python benchmarks/rehearsal.py [--run runs/rehearsal])

What it does, each step printing its outcome:

1. data: a small synthetic Severstal-layout set (64x256 images) in ``--data``;
2. s3: moto's S3 server on a free port of 127.0.0.1 and a bucket; the run's storage is given as a
   user gives MinIO's: ``s3://steel-ray/runs?endpoint_override=127.0.0.1:PORT&scheme=http``;
3. head: ``ray start --head`` (1 CPU, token authentication as in the cluster files);
4. node: a second ``ray start --address ...`` (1 CPU) whose processes live in their own mount
   namespace (``unshare --mount``, root only) with a private tmpfs over ``--run``: what that node
   writes there never reaches this machine's disk, as on another host. Not root: the node shares
   the disk and the steps that need its own disk say SKIPPED with that reason;
5. refusal: ``steel_ray.search --address`` without ``--storage`` refuses before any trial starts,
   naming the second node (the real probe: a file the node writes into the run folder);
6. search: explore (3 trials), complete (top 2 on 2 folds) and blend with ``--storage s3://...``;
7. kill: while a complete trial runs on the second node with a checkpoint behind it, that node's
   raylet is killed by PID; the trial is retried on the head from its last checkpoint in S3;
8. pool: ``results.parquet`` shows trials on both nodes and the retry (``resumed_after``); S3
   holds each (model, fold) exactly once (OOF and weights), nothing was trained twice;
9. rejoin: a fresh second node joins (as an autoscaler replaces a lost one), on its own disk again;
10. predict: a submission on the workers of both nodes (the new node has none of the run's files and
    fetches the weights from S3), byte for byte the in-process one (``--workers 0``);
11. pseudo: a pseudo-label round on the S3 run (labelling on the workers; each member's config
    read from S3);
12. scratch: no trial or inference worker left a temporary folder on the head.

It ends with ``rehearsal: ok`` or ``rehearsal: FAILED at <step>``; everything it made stays in
``--run`` (the processes' output in ``--run/*.out``, Ray's in its session folder) and Ray is
stopped (``ray stop``: every Ray process on this machine). About 3 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SPACE = """\
description: rehearsal space for 64x256 images (seconds per epoch)
fixed: {batch_size: 8, crop_height: 32, crop_width: 128, epochs: 6, tta: none}
params:
  arch: {type: categorical, choices: [Unet, FPN]}
  encoder: {type: categorical, choices: [tu-test_resnet, tu-test_efficientnet]}
  lr: {type: logfloat, low: 1.0e-3, high: 1.0e-2}
points_to_evaluate:
  - {arch: Unet, encoder: tu-test_resnet, lr: 3.0e-3}
  - {arch: FPN, encoder: tu-test_efficientnet, lr: 5.0e-3}
  - {arch: FPN, encoder: tu-test_resnet, lr: 3.0e-3}
"""


class Failed(RuntimeError):
    pass


class Rehearsal:
    def __init__(self, a):
        self.a = a
        self.run, self.data = Path(a.run).resolve(), Path(a.data).resolve()
        self.py = sys.executable
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.env = dict(os.environ, RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
        self.address = self.storage = self.node2 = self.head_id = None
        self.own_disk, self.skip_reason = False, ""
        self.node2_scratch = self.run / "node2-scratch"  # inside the node's private tmpfs
        self.head_scratch = self.run / "head-scratch"
        self.killed = None

    # -- helpers -------------------------------------------------------------------------------
    def say(self, step: str, outcome: str) -> None:
        print(f"{step:>9}: {outcome}", flush=True)

    def sh(self, *cmd, out: str, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
        """Run a command with its output in RUN/<out>.out; returns the completed process."""
        log = self.run / f"{out}.out"
        with open(log, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=env or self.env, timeout=timeout)
        if check and r.returncode != 0:
            raise Failed(f"{' '.join(map(str, cmd[:4]))} ... exited {r.returncode}; see {log}:\n{_tail(log)}")
        return r

    def nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
                "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], 'head': 'node:__internal_head__' in n['Resources']} "
                "for n in ray.nodes()]))") % self.address
        r = subprocess.run([self.py, "-c", code], capture_output=True, text=True, env=self.env, timeout=120)
        if r.returncode != 0:
            raise Failed(f"cannot list the cluster's nodes: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    # -- steps ---------------------------------------------------------------------------------
    def data_step(self):
        from steel_ray import synth

        if not (self.data / "train.csv").exists():
            synth.generate(self.data, n_train=64, n_test=8, height=64, width=256, seed=5)
        (self.run / "space.yaml").write_text(SPACE)
        self.say("data", f"{self.data} (64 train + 8 test images, 64x256)")

    def head_step(self):
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        self.sh(self.ray, "start", "--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                "--disable-usage-stats", out="ray-head", env={**self.env, "STEEL_RAY_SCRATCH": str(self.head_scratch)})
        self.head_id = next(n["id"] for n in self.nodes() if n["head"])
        self.say("head", f"ray start --head at {self.address} (node {self.head_id[:12]}, 1 CPU)")

    def node_step(self):
        start = [self.ray, "start", f"--address={self.address}", "--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
        env = {**self.env, "STEEL_RAY_SCRATCH": str(self.node2_scratch)}
        if os.geteuid() != 0 or not shutil.which("unshare"):
            self.skip_reason = "not root" if os.geteuid() != 0 else "no unshare"
            self.node2_scratch = self.run / "node2-scratch-shared"
            env["STEEL_RAY_SCRATCH"] = str(self.node2_scratch)
            self.sh(*start, out="ray-node2", env=env)
        else:
            # the shell mounts a private tmpfs over RUN in its new mount namespace, then becomes
            # ray start, whose raylet and workers stay in that namespace after it returns
            script = 'mount -t tmpfs -o size=2g steel_ray_node2 "$1" && shift && exec "$@"'
            r = self.sh("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", self.run, *start,
                        out="ray-node2", env=env, check=False)
            if r.returncode != 0:
                self.skip_reason = f"unshare --mount failed (exit {r.returncode}, see {self.run / 'ray-node2.out'})"
                self.sh(*start, out="ray-node2", env=env)
            else:
                self.own_disk = True
        deadline = time.time() + 60
        while time.time() < deadline:
            others = [n for n in self.nodes() if n["alive"] and not n["head"]]
            if others:
                self.node2 = others[0]["id"]
                break
            time.sleep(1)
        else:
            raise Failed("the second node did not join within 60 s")
        pid = self.node2_raylet()
        disk = "its own mount namespace, a private tmpfs over " + str(self.run) if self.own_disk else \
            f"this machine's disk (SKIPPED own disk: {self.skip_reason})"
        self.say("node", f"second node {self.node2[:12]} (raylet pid {pid}, 1 CPU) on {disk}")

    def node2_raylet(self) -> int:
        """The second node's raylet: the raylet process whose mount namespace is not ours (or, sharing
        the disk, the raylet started last)."""
        mine = os.readlink("/proc/self/ns/mnt")
        raylets = [int(p) for p in _pgrep("raylet/raylet")]
        if self.own_disk:
            other = [p for p in raylets if _mnt_ns(p) not in (None, mine)]
            if len(other) != 1:
                raise Failed(f"expected one raylet in another mount namespace, found {other}")
            return other[0]
        return max(raylets, key=lambda p: os.stat(f"/proc/{p}").st_ctime)

    def refusal_step(self):
        if not self.own_disk:
            self.say("refusal", f"SKIPPED ({self.skip_reason}: every node sees the run folder, so the probe passes)")
            return
        out = self.run / "refused"
        r = self.sh(self.py, "-m", "steel_ray.search", "--space", self.run / "space.yaml", "--data", self.data, "--out", out,
                    "--folds", 2, "--address", self.address, out="refused", check=False)
        text = (self.run / "refused.out").read_text()
        line = next((ln for ln in text.splitlines() if "--address without --storage" in ln), "")
        if r.returncode == 0 or self.node2[:12] not in line:
            raise Failed(f"expected a refusal naming node {self.node2[:12]}; exit {r.returncode}:\n{_tail(self.run / 'refused.out')}")
        if (out / "results.parquet").exists() or (out / "ray").exists() or list(out.glob("oof/*")):
            raise Failed(f"the refused search started trials: {sorted(p.name for p in out.iterdir())}")
        self.say("refusal", f"exit {r.returncode} before any trial: {line.strip()[:160]}...")

    def search_and_kill_steps(self):
        """The S3 search in the background; the second node's raylet is killed during the complete stage."""
        out = self.run / "search"
        cmd = [self.py, "-m", "steel_ray.search", "--space", self.run / "space.yaml", "--data", self.data, "--out", out,
               "--folds", 2, "--num-samples", 3, "--top", 2, "--max-concurrent", 2, "--cpus-per-trial", 1,
               "--max-failures", 2, "--holdout", 0.15, "--address", self.address, "--storage", self.storage]
        log = self.run / "search.out"
        t0 = time.time()
        with open(log, "w") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            p = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, env=self.env)
            try:
                self.killed = self._kill_during_complete(p, log)
                rc = p.wait(timeout=900)
            finally:
                if p.poll() is None:
                    p.kill()
        if rc != 0:
            raise Failed(f"the search exited {rc}:\n{_tail(log)}")
        text = log.read_text()
        self.say("search", f"explore, complete and blend on S3 in {time.time() - t0:.0f} s; " + _summary(text, "complete"))
        return out

    def _kill_during_complete(self, p, log) -> dict:
        """Once the complete stage runs and one of its trials on the second node has finished an
        epoch (its log in the node's scratch folder, read through /proc/PID/root: the node's own
        disk), kill that node's raylet. Returns what was killed."""
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            text = log.read_text()
            if re.search(r"explore: \d+ of \d+ trial\(s\) ended", text):
                hit = self._node2_trial_past_epoch1()
                if hit:
                    pid = self.node2_raylet()
                    os.kill(pid, signal.SIGKILL)
                    self.say("kill", f"raylet {pid} of node {self.node2[:12]} killed while {hit['trial']} ran there "
                             f"(epoch {hit['epoch']} checkpointed)")
                    return hit
            time.sleep(0.25)
        raise Failed("no complete trial ran on the second node (or the search ended first): nothing to kill")

    def _node2_trial_past_epoch1(self) -> dict | None:
        raylet = self.node2_raylet()
        root = Path(f"/proc/{raylet}/root") if self.own_disk else Path("/")
        scratch = root / str(self.node2_scratch).lstrip("/")
        for f in scratch.glob("steel_ray_trial_*/logs/trials/*.log"):
            with contextlib.suppress(OSError):
                epochs = re.findall(r"fold (\d+) epoch (\d+)/(\d+)", f.read_text())
                # epoch n written to the log, then reported with its checkpoint: wait for n >= 1 and
                # a little more (the upload), and leave at least one epoch to run
                if epochs and 1 <= int(epochs[-1][1]) < int(epochs[-1][2]) and time.time() - f.stat().st_mtime > 1.5:
                    return {"trial": f.stem, "epoch": int(epochs[-1][1])}
        return None

    def pool_step(self, out: Path):
        import pandas as pd
        from s3_server import list_keys

        t = pd.read_parquet(out / "results.parquet")
        nodes = set(t.node_id[t.node_id != ""])
        if not {self.head_id, self.node2} <= nodes:
            raise Failed(f"results.parquet's node_id shows {sorted(n[:12] for n in nodes)}, not both nodes")
        model, fold = self.killed["trial"].rsplit("-fold", 1)
        row = t[(t.stage == "complete") & (t.model_id == model) & (t.fold == int(fold))]
        if len(row) != 1 or row.iloc[0].status != "TERMINATED" or row.iloc[0].node_id != self.head_id \
                or row.iloc[0].resumed_after < self.killed["epoch"]:
            raise Failed(f"the killed trial {self.killed['trial']} was not retried on the head from its checkpoint:\n"
                         f"{row[['status', 'node_id', 'resumed_after', 'epochs_run']].to_string()}")
        trial_log = (out / "logs" / "trials" / f"{self.killed['trial']}.log").read_text()
        if f"resuming after epoch {row.iloc[0].resumed_after}" not in trial_log:
            raise Failed(f"the retried trial's log does not say it resumed:\n{trial_log[-1500:]}")
        rid = json.loads((out / "search.json").read_text())["run_id"]
        keys = list_keys(self.storage, f"{rid}/pool")
        done = t[t.status == "TERMINATED"].drop_duplicates(["model_id", "fold"])
        want_oof = sorted(f"oof/model_id={m}/fold={f}/part-0.parquet" for m, f in zip(done.model_id, done.fold))
        oofs = [k for k in keys if k.startswith("oof/")]
        if oofs != want_oof:
            raise Failed(f"the S3 pool's OOF files differ from the ended trials:\n{oofs}\n{want_oof}")
        weights = [k for k in keys if k.endswith("best.pt")]
        if len(weights) != len(want_oof):
            raise Failed(f"{len(weights)} weight files in S3 for {len(want_oof)} (model, fold)")
        trained = t[(t.status == "TERMINATED") & (t.stage == "complete")]
        twice = trained[trained.duplicated(["model_id", "fold"], keep=False)]
        if len(twice):
            raise Failed(f"trained twice:\n{twice[['model_id', 'fold']].to_string()}")
        on = t[t.node_id != ""].groupby(t.node_id.str[:12]).size().to_dict()
        self.say("pool", f"trials per node {on}; {len(oofs)} OOF + {len(weights)} weights in S3, each once; "
                 f"{self.killed['trial']} retried on the head after epoch {row.iloc[0].resumed_after}")

    def rejoin_step(self, out: Path):
        """A fresh second node (as an autoscaler replaces a lost one), again on a disk of its own."""
        dead = self.node2
        self.node_step()
        if self.node2 == dead:
            raise Failed("the new node has the dead node's id")

    def predict_step(self, out: Path):
        """predict on the cluster's workers: one per node; the new node has none of the run's files
        (its tmpfs hides them) and fetches the weights from S3."""
        sub = self.run / "submission.csv"
        self.sh(self.py, "-m", "steel_ray.predict", "--run", out, "--images", self.data / "test_images", "--out", sub,
                "--address", self.address, "--workers", 2, out="predict")
        import pandas as pd

        s = pd.read_csv(sub)
        n = len(list((self.data / "test_images").glob("*.jpg")))
        if len(s) != 4 * n:
            raise Failed(f"{sub}: {len(s)} rows for {n} images x 4 classes")
        text = (self.run / "predict.out").read_text()
        m = re.search(r"predicted \d+ image\(s\) on (\d+) node\(s\): (.*)", text)
        if not m or self.node2[:12] not in m.group(2) or self.head_id[:12] not in m.group(2):
            raise Failed(f"predict did not run on both nodes:\n{_tail(self.run / 'predict.out')}")
        local = self.sh(self.py, "-m", "steel_ray.predict", "--run", out, "--images", self.data / "test_images", "--out",
                        self.run / "submission-in-process.csv", "--workers", 0, out="predict")
        if local.returncode != 0 or sub.read_bytes() != (self.run / "submission-in-process.csv").read_bytes():
            raise Failed("the workers' submission differs from the in-process one")
        self.say("predict", f"{sub}: {n} images x 4 classes on the workers of both nodes (the new node fetched the "
                 "weights from S3); identical to the in-process submission")

    def pseudo_step(self, out: Path):
        r = self.sh(self.py, "-m", "steel_ray.pseudo", "--run", out, "--images", self.data / "test_images", "--out",
                    self.run / "pseudo", "--min-confidence", 0.5, "--max-concurrent", 1, "--address", self.address,
                    "--storage", self.storage, out="pseudo", check=False)
        text = (self.run / "pseudo.out").read_text()
        if r.returncode != 0:
            raise Failed(f"the pseudo round exited {r.returncode}:\n{_tail(self.run / 'pseudo.out')}")
        if not (self.run / "pseudo" / "blend" / "blend.json").exists():
            raise Failed("the pseudo round wrote no blend")
        self.say("pseudo", "a round on the S3 run (members' configs read from S3); " + _summary(text, "complete"))

    def scratch_step(self):
        mine = self.head_scratch
        left = sorted(p.name for p in mine.iterdir()) if mine.exists() else []
        # the second node's scratch: gone with its tmpfs once the node died; while it lived, the
        # kill step read it; a node sharing the disk left it in RUN
        other = self.node2_scratch
        left2 = sorted(p.name for p in other.iterdir()) if (not self.own_disk and other.exists()) else []
        # the killed attempt cannot clean up (SIGKILL): its folder stays on the dead node's disk
        if left or len(left2) > 1:
            raise Failed(f"temporary trial folders left: head {left}, second node {left2}")
        self.say("scratch", "no temporary trial folder left on the head" + (
            "" if self.own_disk else f"; the second node's: {left2 or 'none'} (the killed attempt's)"))

    def stop(self):
        subprocess.run([self.ray, "stop", "--force"], capture_output=True, env=self.env, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pgrep(pattern: str) -> list[str]:
    r = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return r.stdout.split()


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _summary(text: str, stage: str) -> str:
    """The stage's closing line ("complete: 2 of 2 trial(s) ended (0 failed); ...") without its time."""
    m = re.findall(rf"{stage}: \d+ of \d+ trial\(s\) ended[^\n]*", text)
    return m[-1] if m else f"no {stage} summary"


def _tail(path, n: int = 25) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text().splitlines()[-n:])
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="runs/rehearsal", help="folder for everything the rehearsal makes (emptied first)")
    ap.add_argument("--data", default="data/rehearsal", help="the synthetic set (made when missing)")
    a = ap.parse_args(argv)
    from s3_server import s3_storage

    if _pgrep("raylet/raylet"):
        print("rehearsal: FAILED at start: a Ray cluster is already running on this machine (ray stop first)")
        return 1
    shutil.rmtree(a.run, ignore_errors=True)
    Path(a.run).mkdir(parents=True)
    r = Rehearsal(a)
    step = "data"
    t0 = time.time()
    try:
        r.data_step()
        step = "s3"
        with s3_storage(prefix="runs", log_file=Path(a.run) / "s3.log") as storage:
            r.storage = storage
            r.env.update({k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                      "AWS_EC2_METADATA_DISABLED")})
            r.say("s3", f"moto S3 server, --storage {storage}")
            for step in ("head", "node", "refusal"):
                getattr(r, f"{step}_step")()
            step = "search"
            out = r.search_and_kill_steps()
            for step in ("pool", "rejoin", "predict", "pseudo"):
                getattr(r, f"{step}_step")(out)
            step = "scratch"
            r.scratch_step()
    except Failed as e:
        print(f"{step:>9}: {e}")
        print(f"rehearsal: FAILED at {step}")
        return 1
    finally:
        r.stop()
    print(f"rehearsal: ok ({time.time() - t0:.0f} s; everything it made is in {a.run})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
