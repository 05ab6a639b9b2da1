"""A process started by ``srun`` (no torchrun) joins its job's process group.

``srun`` gives each task SLURM_PROCID (its rank), SLURM_NTASKS (the world), SLURM_LOCALID (its
rank on the node), the job's node list in Slurm's compressed form (``gpu[01-04,07],cpu5``) and
SLURM_JOB_ID. torch's ``env://`` rendezvous wants RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT: the master is the first host of the list (task 0 runs there: Slurm hands tasks to
the nodes in list order) and the port is derived from the job id, so every task of a job agrees
on it without talking, and two jobs sharing a node rarely collide. Variables already set
(torchrun's, or a MASTER_PORT of the user's) win. This module imports no torch.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping

from siamae.errors import ConfigError

# Below Linux's ephemeral range (32768-60999), where the kernel picks outgoing ports.
PORT_BASE, PORT_SPAN = 12000, 20000
# The node list of the job step first (the nodes this srun runs on), then the job's.
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on the commas outside brackets: ``a[1,2],b`` -> ``a[1,2]``, ``b``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("']' without '['")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("'[' without ']'")
    parts.append(text[start:])
    return parts


def _expand_ranges(body: str) -> list[str]:
    """``01-03,07`` -> 01, 02, 03, 07 (zero padding kept)."""
    out = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"bad range {item!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"range {item!r} runs backwards")
        width = len(low)
        out += [f"{n:0{width}d}" for n in range(int(low), int(high) + 1)]
    return out


def _expand_group(group: str) -> list[str]:
    """One host expression, possibly with several bracket sets (``r[1-2]n[1-2]``: 4 hosts)."""
    tokens = re.findall(r"[^\[\]]+|\[[^\[\]]*\]", group)
    if "".join(tokens) != group:
        raise ValueError("nested or unbalanced brackets")
    hosts = [""]
    for token in tokens:
        if token.startswith("["):
            hosts = [h + suffix for h in hosts for suffix in _expand_ranges(token[1:-1])]
        else:
            hosts = [h + token for h in hosts]
    return hosts


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: ``node[01-03,07],gpu5`` -> node01,
    node02, node03, node07, gpu5 (what ``scontrol show hostnames`` prints)."""
    try:
        hosts = [h for group in _split_top_level(text.strip()) for h in _expand_group(group)]
    except ValueError as err:
        raise ConfigError(
            f"Slurm node list {text!r} cannot be read ({err}); set MASTER_ADDR to the first "
            "node's host name"
        ) from None
    if not hosts or any(not h for h in hosts):
        raise ConfigError(
            f"Slurm node list {text!r} names no host; set MASTER_ADDR to the first node's host name"
        )
    return hosts


def port_for_job(job_id: str) -> int:
    """The rendezvous port every task of job ``job_id`` derives alike (``123`` or ``123_4``)."""
    number = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + number % PORT_SPAN


def started_by_srun(environ: Mapping[str, str]) -> bool:
    """A Slurm task without a launcher's variables (no torchrun: WORLD_SIZE absent)."""
    return "WORLD_SIZE" not in environ and "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ


def process_group_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables torch's ``env://`` rendezvous reads, from Slurm's; {} outside ``srun`` or
    under a launcher. A variable already in ``environ`` is kept."""
    if not started_by_srun(environ):
        return {}
    world = environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])
    derived = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": world,
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
    }
    if int(world) > 1:
        if "MASTER_ADDR" not in environ:
            nodelist = next((environ[v] for v in NODELIST_VARIABLES if environ.get(v)), None)
            if nodelist is None:
                raise ConfigError(
                    "a Slurm task without SLURM_JOB_NODELIST: set MASTER_ADDR to the first "
                    "node's host name"
                )
            derived["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
        if "MASTER_PORT" not in environ:
            job_id = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID"))
            if job_id is None:
                raise ConfigError("a Slurm task without SLURM_JOB_ID: set MASTER_PORT")
            derived["MASTER_PORT"] = str(port_for_job(job_id))
    return {k: v for k, v in derived.items() if k not in environ}
