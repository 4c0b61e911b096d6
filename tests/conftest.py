"""Test-session settings.

One intra-op thread: the models in the tests are tiny, and on a busy 2-core machine
OpenMP threads waiting for each other made a tiny training step 10x slower
(35 ms with 2 threads against 3.3 ms with 1, TinyCNN forward+backward, batch 4).
"""

import torch

torch.set_num_threads(1)
