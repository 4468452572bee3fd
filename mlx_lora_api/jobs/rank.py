"""One rank of a data-parallel fine-tune: `python -m mlx_lora_api.jobs.rank`, started by
`mlx.launch` on every host (jobs/cluster.py), the job on its stdin.

Every rank trains on its share of each global batch (tasks/finetune.py with MLX's group); rank 0
alone writes into the job's folder and prints the events on stdout, each a marked line. The
other ranks write their checkpoints and adapter into a scratch folder of their own, removed at
the end, and say nothing but their own failure (on stderr).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import msgspec

from .cluster import MARKER, RankJob
from .process import begin, describe_error, peak_rss_bytes, set_precision


def share_cores(job: RankJob) -> None:
    """Ranks on one host split its cores between them (each its own, and as many BLAS threads):
    two ranks of two threads each on two cores ran 5x slower than one. Before the BLAS loads."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    if rank >= len(job.hosts) or not hasattr(os, "sched_setaffinity"):
        return
    host = job.hosts[rank]
    here, index = job.hosts.count(host), job.hosts[:rank].count(host)
    if here < 2:
        return
    cores = sorted(os.sched_getaffinity(0))
    mine = cores[index * len(cores) // here : (index + 1) * len(cores) // here] or [cores[index % len(cores)]]
    os.sched_setaffinity(0, mine)
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(len(mine))


def main() -> None:
    job = msgspec.json.decode(sys.stdin.buffer.readline(), type=RankJob)
    share_cores(job)
    set_precision("finetune")
    os.environ["MLX_LORA_API_LEVERS"] = job.levers
    begin("rank")  # the fast BLAS, before MLX
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend=job.backend)
    rank = group.rank()

    def emit(event: dict, stream=sys.stdout) -> None:
        stream.write(MARKER + msgspec.json.encode(event).decode() + "\n")
        stream.flush()

    on_event = emit if rank == 0 else (lambda event: None)
    scratch = None if rank == 0 else Path(tempfile.mkdtemp(prefix=f"mlx-lora-api-rank{rank}-"))
    try:
        # Which process each rank is (a test kills one): rank 0 learns every rank's pid.
        mine = mx.zeros(group.size(), dtype=mx.int32).at[rank].add(os.getpid())
        pids = mx.distributed.all_sum(mine, group=group, stream=mx.cpu).tolist()
        ranks = group.size()
        on_event({"type": "distributed", "ranks": ranks, "backend": job.backend, "hosts": job.hosts, "pids": pids})
        from ..tasks import finetune  # MLX

        metrics = finetune.train_adapter(
            job.base_path,
            job.base_ref,
            job.request,
            scratch or Path(job.out_dir),
            on_event,
            resume=job.resume,
            retention_cache=Path(job.retention_cache) if job.retention_cache and rank == 0 else None,
            initial_weights=Path(job.initial_weights) if job.initial_weights else None,
            group=group,
            checkpoints_from=Path(job.out_dir),
        )
        # Every rank's peak memory, in the metrics rank 0 hands back.
        peak = mx.zeros(ranks, dtype=mx.float32).at[rank].add(peak_rss_bytes() / 2**20)
        peaks: list[float] = mx.distributed.all_sum(peak, group=group, stream=mx.cpu).tolist()  # type: ignore[assignment]
        metrics.update(
            ranks=ranks, backend=job.backend, hosts=job.hosts, rank_peak_memory_mib=[round(p) for p in peaks]
        )
        on_event({"type": "result", "metrics": metrics})
    except BaseException as e:
        traceback.print_exc()
        failure = {"type": "rank_error", "rank": rank, "message": describe_error(e)}
        emit(failure, sys.stdout if rank == 0 else sys.stderr)
        sys.stdout.flush()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        os._exit(1)  # at once: a rank waiting in a collective would otherwise hold the others
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
