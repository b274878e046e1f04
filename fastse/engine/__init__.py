"""The pretraining engine: optimizers and schedules (`optim`), torchrun processes (`launch`; their collectives
are `fastse.distributed`'s), mixed precision (`amp`), metrics output (`logging`) and the loop (`trainer.train`)."""
