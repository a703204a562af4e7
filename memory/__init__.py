"""Memory policies: recomputation, activation offload, tiling, optimizer offload, the planner."""
