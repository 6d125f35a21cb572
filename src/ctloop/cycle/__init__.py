"""One continuous-training cycle: the stage declaration, the stage functions, the cycle folder, run_cycle."""
