"""Records in and out: reading files, validation with quarantine, eval-set contamination, the replay buffer."""
