"""Durable checkpoints of a job's shard: safetensors for the buffers, a JSON manifest beside.

Layout under the checkpoint directory:

    LOCK                               held (flock) by the one shard that uses the directory
    <job>/<version:012d>.safetensors   parameters, every state buffer, per-tensor steps
    <job>/<version:012d>.json          the manifest: job, spec, shard, version, worker steps,
                                       the tensors' sha256, and the sha256 of its own fields

<job> is the job's name in urlsafe base64, or "sha256.<hex digest of the name>" where that
would be longer than a file name may be; the manifest holds the name, checked on restore.
Each file is written to a temporary name, fsynced, renamed into place, and the directory is
fsynced; the manifest goes last, so a checkpoint exists only once both files are complete.
A restart (ShardStore.restore_all) takes each job's newest checkpoint that verifies.
"""
from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

import numpy as np
from google.protobuf.message import DecodeError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from optserve.kernels import FlatState
from optserve.proto.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.server")

# 2: the manifest's own fields are checksummed too. Format 1 still loads, so that an upgrade
# restores what the previous version wrote; its fields are checked one by one, no checksum.
FORMAT = 2
READABLE = (1, 2)
NAME_MAX = 255   # bytes in a file name (ext4, xfs, tmpfs)


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, lock: bool = False):
        """With `lock`, takes the directory for this process until `unlock` or its exit: two
        shards that share one would overwrite each other's jobs. Raises OSError, naming the
        directory, when another shard holds it."""
        self.root = pathlib.Path(directory)
        self.keep = max(1, keep)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.root / "LOCK") if lock else None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()   # which releases the flock
            self._lock = None

    def job_dir(self, job: str) -> pathlib.Path:
        # Job names are user strings: encode them into one safe path component. '.' is not in
        # base64's alphabet, so a hashed name never meets an encoded one.
        name = base64.urlsafe_b64encode(job.encode()).decode().rstrip("=")
        if len(name) > NAME_MAX:
            name = "sha256." + hashlib.sha256(job.encode()).hexdigest()
        return self.root / name

    def save(self, job, version: int, worker_steps: dict[int, int]) -> pathlib.Path:
        """Writes the job's state, which is that of `version`, atomically. Call it where
        nothing else writes the state: with the job's lock held and no step running, or
        from the step that produced `version`."""
        directory = self.job_dir(job.name)
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{version:012d}"
        state = job.state.host()
        tensors = {"param": state.param, "steps": state.steps}
        tensors.update({f"state.{k}": v for k, v in state.fields.items()})
        blob = st_save(tensors)
        manifest = {
            "format": FORMAT,
            "job": job.name,
            "shard": job.shard,
            "version": version,
            "spec": base64.b64encode(job.spec.SerializeToString(deterministic=True)).decode(),
            "worker_steps": {str(w): s for w, s in worker_steps.items()},
            "tensors_file": f"{stem}.safetensors",
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        self._prune(directory)   # first what failed writes left: it may be what fills the disk
        try:
            _write_atomically(directory / f"{stem}.safetensors", blob)
            _write_atomically(directory / f"{stem}.json", json.dumps(manifest, indent=1).encode())
        finally:
            self._prune(directory)
        return directory / f"{stem}.json"

    def delete(self, job: str) -> None:
        """Removes every checkpoint of `job`: the manifests first, so that a crash part way
        through leaves nothing a restart would restore."""
        directory = self.job_dir(job)
        for manifest in directory.glob("*.json"):
            manifest.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)

    def _prune(self, directory: pathlib.Path) -> None:
        """Keeps the newest `keep` checkpoints and nothing else: not the older ones (manifest
        first), nor tensors whose manifest was never written, nor temporary files. Called
        between writes only: a job's saves are never concurrent."""
        manifests = sorted(directory.glob("*.json"))
        for old in manifests[:-self.keep]:
            old.unlink(missing_ok=True)
        kept = {f"{m.stem}.safetensors" for m in manifests[-self.keep:]}
        for path in directory.iterdir():
            orphan = path.suffix == ".safetensors" and path.name not in kept
            if orphan or path.name.startswith("."):   # "." starts a temporary file's name
                path.unlink(missing_ok=True)

    def versions(self, job: str) -> list[int]:
        return sorted(int(p.stem) for p in self.job_dir(job).glob("*.json"))

    def on_disk(self) -> Iterator[tuple[pathlib.Path, list[pathlib.Path]]]:
        """Every job directory, with its manifests newest first."""
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            yield directory, sorted(directory.glob("*.json"), reverse=True)

    def load(self, manifest_path: pathlib.Path) -> tuple[dict, pb.JobSpec, FlatState]:
        """Reads and verifies one checkpoint; raises ValueError when it does not verify, or
        OSError when it cannot be read."""
        manifest = json.loads(manifest_path.read_bytes())
        if not isinstance(manifest, dict):
            raise ValueError("the manifest is not a JSON object")
        if manifest.get("format") not in READABLE:
            raise ValueError(f"unknown checkpoint format {manifest.get('format')!r}")
        # Format 1 has no checksum of its own; a damaged format field must not waive one.
        if ((manifest["format"] > 1 or "manifest_sha256" in manifest)
                and manifest.get("manifest_sha256") != _manifest_digest(manifest)):
            raise ValueError("manifest checksum mismatch")
        job = _field(manifest, "job", str)
        if self.job_dir(job) != manifest_path.parent:
            raise ValueError(f"the manifest is job {job!r}'s, which is not this directory's")
        if _field(manifest, "version", int) != int(manifest_path.stem):
            raise ValueError(f"the manifest says version {manifest['version']}")
        _field(manifest, "shard", int)
        steps = _field(manifest, "worker_steps", dict)
        if not all(w.isdigit() and type(s) is int for w, s in steps.items()):
            raise ValueError("malformed worker steps")
        if manifest.get("tensors_file") != f"{manifest_path.stem}.safetensors":
            raise ValueError(f"tensors file {manifest.get('tensors_file')!r}")
        try:
            spec = pb.JobSpec.FromString(base64.b64decode(_field(manifest, "spec", str),
                                                          validate=True))
        except (binascii.Error, DecodeError) as e:
            raise ValueError(f"undecodable spec ({e})") from None
        if spec.job != job:
            raise ValueError(f"the spec is job {spec.job!r}'s, the manifest {job!r}'s")
        blob = (manifest_path.parent / manifest["tensors_file"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest.get("sha256"):
            raise ValueError("checksum mismatch")
        tensors = st_load(blob)
        fields = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        state = FlatState(tensors["param"], fields, tensors["steps"].astype(np.int64))
        return manifest, spec, state

    def load_version(self, job: str, version: int):
        return self.load(self.job_dir(job) / f"{version:012d}.json")


def _manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's other fields, in one canonical JSON form."""
    fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _field(manifest: dict, key: str, kind: type):
    value = manifest.get(key)
    if type(value) is not kind:   # not isinstance: a bool is no version
        raise ValueError(f"the manifest has no {kind.__name__} {key!r}")
    return value


def _lock(path: pathlib.Path):
    """The open lock file, flocked; it holds the pid of its holder, for the message."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise OSError(f"checkpoint directory {path.parent} is in use by another shard"
                      f"{f' (pid {holder})' if holder else ''}: give each shard its own "
                      "--checkpoint-dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
