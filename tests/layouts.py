"""The 2-rank parallel layouts every invariance test compares with the single process."""

from vespo_megatron.megatron.parallel_setup import ParallelConfig

TWO_RANK_LAYOUTS = {
    "dp2": ParallelConfig(),
    "tp2_sp": ParallelConfig(tp=2, sp=True),
    "cp2": ParallelConfig(cp=2),
    "ep2": ParallelConfig(ep=2),
    "pp2": ParallelConfig(pp=2),
}
