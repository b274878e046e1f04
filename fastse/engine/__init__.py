"""The pretraining engine: optimizers and schedules (`optim`), torchrun processes (`distributed`),
metrics output (`logging`) and the loop (`trainer.train`)."""
