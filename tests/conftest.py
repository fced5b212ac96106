import os

# Distributed tests start several CPU processes on a 2-core machine: one intra-op thread each keeps them
# from fighting over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
