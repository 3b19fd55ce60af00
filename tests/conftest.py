"""Test-session settings shared by every test module.

Torch runs single-threaded here and in the subprocesses tests start (OMP_NUM_THREADS is inherited):
on a 2-core machine shared with other work, two OpenMP threads spin against each other (a tiny
conv took 24 ms instead of 0.07 ms) and the tiny test models gain nothing from a second thread.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
