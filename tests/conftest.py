"""Shared test setup."""

import torch

# The tests work on tiny tensors, where intra-op threads cost more than they give (and stall
# badly when the cores are shared): one thread keeps them fast and their timing steady.
torch.set_num_threads(1)
