"""Beyond one node: the same torchrun command, started on every node by Slurm or Kubernetes."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.config import FlywheelConfig, LaunchSpec
from flywheel.launch.ranks import ENV_LAUNCH, ENV_LOGS


def _node_command(spec: LaunchSpec, stage_args: list[str], nnodes: int, endpoint: str, job_id: str) -> list[str]:
    """The per-node torchrun command (c10d rendezvous: node ranks are assigned as the agents join)."""
    return ["python", "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc-per-node={spec.nproc_per_node or 1}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={job_id}", "--max-restarts=0", f"--shutdown-timeout={int(spec.grace_seconds)}",
            "-m", "flywheel.cli", *stage_args]


@dataclass(frozen=True)
class _NodeJob:
    """What both job files say: the agents' command, how many nodes start one, where their logs go."""

    spec: LaunchSpec
    stage_args: list[str]
    name: str  # the job's name on the cluster
    job_id: str  # torchrun's rendezvous id
    nodes: int
    logs: Path

    @property
    def gpus(self) -> int:
        return self.spec.nproc_per_node or 1


def render_jobs(cfg: FlywheelConfig, spec: LaunchSpec, stage: str, stage_args: list[str], folder: Path,
                nodes: int | None = None, image: str = "ghcr.io/your-org/flywheel:latest",
                namespace: str = "flywheel", home_claim: str = "flywheel-home") -> dict[str, Path]:
    """A Slurm batch script and a Kubernetes Indexed Job that start `nodes` torchrun agents of one stage.

    `nodes` defaults to all `spec.nnodes`; a round that already runs node 0's agent itself renders the
    others (`nnodes - 1`) and waits for them in torchrun's rendezvous. The home must be shared storage.
    """
    import yaml

    name = re.sub(r"[^a-z0-9-]", "-", f"flywheel-{cfg.name}-{stage}".lower())[:50].strip("-")
    job = _NodeJob(spec, stage_args, name, folder.name, spec.nnodes if nodes is None else nodes, folder / "logs")
    job.logs.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    sbatch = folder / f"{stage}.sbatch"
    sbatch.write_text(_slurm_script(job))
    k8s = folder / f"{stage}-k8s.yaml"
    k8s.write_text(yaml.safe_dump_all(_kubernetes_docs(cfg, job, image, namespace, home_claim), sort_keys=False))
    return {"slurm": sbatch, "kubernetes": k8s}


def _slurm_script(job: _NodeJob) -> str:
    """One agent per node of the allocation; they meet at the allocation's first node unless an endpoint is set."""
    spec = job.spec
    endpoint = spec.rdzv_endpoint or "$head:29400"  # the allocation's first node
    line = " ".join(f'--rdzv-endpoint="{endpoint}"' if a == "--rdzv-endpoint=@" else shlex.quote(a)
                    for a in _node_command(spec, job.stage_args, spec.nnodes, "@", job.job_id))
    return "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus}",
        f"#SBATCH --output={job.logs}/slurm-%j-%N.log",
        f"#SBATCH --signal=TERM@{int(spec.grace_seconds) + 60}  # preemption: every rank saves before the limit",
        "set -euo pipefail",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"export {ENV_LOGS}={shlex.quote(str(job.logs))} {ENV_LAUNCH}=torchrun",
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"srun --kill-on-bad-exit=1 {line}",
        "",
    ])


def _kubernetes_docs(cfg: FlywheelConfig, job: _NodeJob, image: str, namespace: str,
                     home_claim: str) -> list[dict[str, Any]]:
    """A headless Service and an Indexed Job; the pods meet at pod 0 through the service unless an endpoint is set."""
    spec, name = job.spec, job.name
    endpoint = spec.rdzv_endpoint or f"{name}-0.{name}:29400"  # pod 0 of the Indexed Job, via the headless service
    command = _node_command(spec, job.stage_args, spec.nnodes, endpoint, job.job_id)
    container = {"name": "flywheel", "image": image, "command": command, "workingDir": str(Path.cwd()),
                 "env": [{"name": ENV_LOGS, "value": str(job.logs)}, {"name": ENV_LAUNCH, "value": "torchrun"}],
                 "resources": {"limits": {"nvidia.com/gpu": job.gpus}},
                 "volumeMounts": [{"name": "flywheel-home", "mountPath": str(cfg.home)}]}
    pod = {"subdomain": name, "restartPolicy": "Never", "terminationGracePeriodSeconds": int(spec.grace_seconds) + 30,
           "containers": [container],
           "volumes": [{"name": "flywheel-home", "persistentVolumeClaim": {"claimName": home_claim}}]}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
               "spec": {"clusterIP": "None", "selector": {"job-name": name},
                        "ports": [{"name": "rdzv", "port": 29400}]}}
    indexed = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": namespace},
               "spec": {"completionMode": "Indexed", "completions": job.nodes, "parallelism": job.nodes,
                        "backoffLimit": 0, "template": {"spec": pod}}}
    return [service, indexed]
