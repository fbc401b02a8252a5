"""What the engine does because a cluster runs it: several processes started by ``torchrun`` (``distributed``:
the loss agreed over ranks once per step, evaluation rows gathered in order, SyncBatchNorm, group teardown), a
scheduler that stops jobs (``preempt``: SIGTERM, SIGUSR1 and Ctrl-C turned into a stop at a step boundary, with a
checkpoint, on every rank) and one random stream per rank (``seeding``). Apart from the loop because each answers
a question of the cluster, not of training (which rank, which signal, which stream), and a reader looking for
multi-GPU or requeue behaviour finds all of it here; they import nothing from the engine, the engine imports them."""
