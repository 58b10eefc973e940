"""Command-line plumbing shared by the runners: device choice and CPU thread count.

CPU runs default to one intra-op thread: on this project's shared 2-core machines, two threads
under a load average of ~4 gave prefill times of 215-3644 ms against 164-210 ms with one thread
(10 runs each), because every parallel region waits for the slowest, preempted thread.
"""

from __future__ import annotations

import argparse

import torch

DEFAULT_CPU_THREADS = 1


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and models, seconds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"CPU intra-op threads (default {DEFAULT_CPU_THREADS} on CPU; untouched on GPU)",
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default bench/results/<device>)"
    )


def setup(args: argparse.Namespace) -> torch.device:
    """The device the arguments ask for (cuda when present by default), with CPU threads set."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(DEFAULT_CPU_THREADS)
    torch.set_grad_enabled(False)  # inference benchmarks: no autograd bookkeeping anywhere
    return device
