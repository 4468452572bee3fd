"""Jobs: the durable store, the runner that starts a worker process per job, the worker, and
the generation process. Nothing here knows of HTTP; MLX runs only in the processes they start."""
