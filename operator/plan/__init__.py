"""Planning: estimate a job's peak GPU memory and choose where it runs. Pure, no I/O beyond config reads."""
