"""Jobs: one module per job, composing actors with Ray Data and Ray Train."""
