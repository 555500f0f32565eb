"""The flags of a run over several processes (jaxrun: one process per host, JAX's multi-controller
runtime), and the environment variables that carry them.

ref never starts JAX: `ref.crosscheck --backend jax` only passes these settings on to its backend
through the environment (`distributed_environ`); jaxrun.distributed reads them, a flag before its
variable. `python -m jaxrun.launch` sets the variables for the processes it starts.
"""
from __future__ import annotations

import argparse

# setting -> environment variable
ENV = {"coordinator": "JAXRUN_COORDINATOR", "num_processes": "JAXRUN_NUM_PROCESSES",
       "process_id": "JAXRUN_PROCESS_ID", "distributed": "JAXRUN_DISTRIBUTED",
       "init_timeout": "JAXRUN_INIT_TIMEOUT", "heartbeat_timeout": "JAXRUN_HEARTBEAT_TIMEOUT"}
INIT_TIMEOUT = 60.0       # seconds for every process to connect to the coordinator
HEARTBEAT_TIMEOUT = 20.0  # seconds without a heartbeat before a process counts as dead


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("more than one process (one per host; README 'More than one host')")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help=f"address of process 0, which every process connects to (${ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, metavar="N", help=f"processes in the run (${ENV['num_processes']})")
    g.add_argument("--process-id", type=int, metavar="I",
                   help=f"this process's number, 0 .. N-1; process 0 prints the results (${ENV['process_id']})")
    g.add_argument("--distributed", choices=("auto",),
                   help="take the three values above from the cluster (SLURM, Open MPI...) as JAX detects them "
                        f"(${ENV['distributed']})")
    g.add_argument("--init-timeout", type=float, metavar="SECONDS",
                   help=f"how long every process may take to connect (default {INIT_TIMEOUT:g}; "
                        f"${ENV['init_timeout']})")
    g.add_argument("--heartbeat-timeout", type=float, metavar="SECONDS",
                   help=f"a process silent this long counts as dead and ends the run (default "
                        f"{HEARTBEAT_TIMEOUT:g}; ${ENV['heartbeat_timeout']})")


def distributed_environ(args: argparse.Namespace) -> dict[str, str]:
    """The environment variables of the distributed flags given on the command line."""
    return {var: str(getattr(args, key)) for key, var in ENV.items() if getattr(args, key, None) is not None}
