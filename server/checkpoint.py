"""Durable checkpoints of a job's shard: safetensors for the buffers, a JSON manifest beside.

Layout under the checkpoint directory:

    <job>/<version:012d>.safetensors   parameters, every state buffer, per-tensor steps
    <job>/<version:012d>.json          the manifest: spec, shard, version, worker steps, sha256

Each file is written to a temporary name, fsynced, renamed into place, and the directory is
fsynced; the manifest goes last, so a checkpoint exists only once both files are complete.
Restoring takes the newest checkpoint whose checksum verifies and skips broken ones.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from optserve.kernels import FlatState
from optserve.proto.v1 import optserve_pb2 as pb

log = logging.getLogger("optserve.server")

FORMAT = 1


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.root = pathlib.Path(directory)
        self.keep = max(1, keep)
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job: str) -> pathlib.Path:
        # Job names are user strings: encode them into one safe path component.
        return self.root / base64.urlsafe_b64encode(job.encode()).decode().rstrip("=")

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
        _write_atomically(directory / f"{stem}.safetensors", blob)
        _write_atomically(directory / f"{stem}.json", json.dumps(manifest, indent=1).encode())
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
        manifests = sorted(directory.glob("*.json"))
        for old in manifests[:-self.keep]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

    def versions(self, job: str) -> list[int]:
        return sorted(int(p.stem) for p in self.job_dir(job).glob("*.json"))

    def load(self, manifest_path: pathlib.Path) -> tuple[dict, pb.JobSpec, FlatState]:
        """Reads and verifies one checkpoint; raises ValueError when it does not verify."""
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"unknown checkpoint format {manifest.get('format')!r}")
        blob = (manifest_path.parent / manifest["tensors_file"]).read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
            raise ValueError("checksum mismatch")
        tensors = st_load(blob)
        spec = pb.JobSpec.FromString(base64.b64decode(manifest["spec"]))
        fields = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        state = FlatState(tensors["param"], fields, tensors["steps"].astype(np.int64))
        return manifest, spec, state

    def load_version(self, job: str, version: int):
        return self.load(self.job_dir(job) / f"{version:012d}.json")

    def newest_valid(self):
        """For every job on disk, its newest checkpoint that verifies."""
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for manifest_path in sorted(directory.glob("*.json"), reverse=True):
                try:
                    yield self.load(manifest_path)
                    break
                except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
                    log.warning("skipping checkpoint %s: %s", manifest_path, e)


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
