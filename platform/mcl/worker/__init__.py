"""What runs in each training worker: the phase as a recipe (:mod:`~mcl.worker.recipe`), the DeepSpeed/torch
step engine (:mod:`~mcl.worker.engine`), losses for methods (:mod:`~mcl.worker.losses`), the job and result of
a phase (:mod:`~mcl.worker.job`), the Ray Train loop (:mod:`~mcl.worker.ray_loop`) and a phase in this process
(:mod:`~mcl.worker.local`)."""
