"""Training: GRPO on TRL's GRPOTrainer, one concept per file (``run`` states the algorithm).

- ``run``: ``train()``, a run's start to its exit status, read top to bottom;
- ``identity``: who is running (rank, attempt, run id) and ISO timestamps;
- ``preflight``: checks that run before any compute is spent (run directory, model path, batch layout);
- ``grpo_config``: what TRL is given (GRPOConfig, dataset rows, reward functions, the DeepSpeed JSON);
- ``trainer``: the GRPOTrainer subclass and its two overrides (``generated``: the adapter to TRL's);
- ``context``: what the trainer and callbacks share for one attempt;
- ``recording``: one trace row per completion;
- ``async_save``: a save copied to host memory and written by a background thread;
- ``sealing``: a save sealed complete, pruned and reported;
- ``callbacks``: step boundaries (stop, save policy), metrics lines, a forced learning rate;
- ``logs``: log line format (ISO time, step, rank), screen vs the run's log file.

Nothing is imported here: the launcher imports parts of rlarith without torch.
"""
