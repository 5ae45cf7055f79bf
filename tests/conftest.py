"""Test-wide settings: one thread per test process (oversubscription is very slow on 2 cores)."""

import torch

torch.set_num_threads(1)
