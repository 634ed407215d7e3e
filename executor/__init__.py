"""The CGOPipe executor: runs an MoE model under a Policy with paged weights, a CPU KV cache and
CPU decode attention, and measures what the HRM predicts (`hrm run`)."""
